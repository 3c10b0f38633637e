//! A safe `s![…]`: the same syntax and result as `ndarray::s!`, built without `unsafe`.
//!
//! `ndarray::s!` expands to an `unsafe` constructor inside the calling crate, which
//! `#![forbid(unsafe_code)]` refuses. This macro computes the input and output dimensions the same
//! way (with `ndarray::SliceNextDim`) and builds the `SliceInfo` through its checked `TryFrom`.

use std::marker::PhantomData;

use ndarray::{Dimension, SliceInfo, SliceInfoElem};

/// The slice info of `indices` for the dimensions computed by [`s!`]. The check cannot fail: the
/// dimensions are derived from the indices themselves.
pub(crate) fn slice_info<const N: usize, Din: Dimension, Dout: Dimension>(
    indices: [SliceInfoElem; N],
    _in_dim: PhantomData<Din>,
    _out_dim: PhantomData<Dout>,
) -> SliceInfo<[SliceInfoElem; N], Din, Dout>
where
    SliceInfo<[SliceInfoElem; N], Din, Dout>:
        TryFrom<[SliceInfoElem; N], Error = ndarray::ShapeError>,
{
    SliceInfo::try_from(indices)
        .expect("s! derives the dimensions from the indices, so they always agree")
}

/// Slice argument constructor, as `ndarray::s!` (ranges, indices, `NewAxis`, `range;step`).
macro_rules! s(
    (@parse $in_dim:expr, $out_dim:expr, [$($stack:tt)*] $r:expr;$s:expr) => {
        match $r {
            r => {
                let in_dim = ::ndarray::SliceNextDim::next_in_dim(&r, $in_dim);
                let out_dim = ::ndarray::SliceNextDim::next_out_dim(&r, $out_dim);
                ([$($stack)* $crate::foundation::slicing::s!(@convert r, $s)], in_dim, out_dim)
            }
        }
    };
    (@parse $in_dim:expr, $out_dim:expr, [$($stack:tt)*] $r:expr) => {
        match $r {
            r => {
                let in_dim = ::ndarray::SliceNextDim::next_in_dim(&r, $in_dim);
                let out_dim = ::ndarray::SliceNextDim::next_out_dim(&r, $out_dim);
                ([$($stack)* $crate::foundation::slicing::s!(@convert r)], in_dim, out_dim)
            }
        }
    };
    (@parse $in_dim:expr, $out_dim:expr, [$($stack:tt)*] $r:expr;$s:expr ,) => {
        $crate::foundation::slicing::s![@parse $in_dim, $out_dim, [$($stack)*] $r;$s]
    };
    (@parse $in_dim:expr, $out_dim:expr, [$($stack:tt)*] $r:expr ,) => {
        $crate::foundation::slicing::s![@parse $in_dim, $out_dim, [$($stack)*] $r]
    };
    (@parse $in_dim:expr, $out_dim:expr, [$($stack:tt)*] $r:expr;$s:expr, $($t:tt)*) => {
        match $r {
            r => {
                $crate::foundation::slicing::s![@parse
                   ::ndarray::SliceNextDim::next_in_dim(&r, $in_dim),
                   ::ndarray::SliceNextDim::next_out_dim(&r, $out_dim),
                   [$($stack)* $crate::foundation::slicing::s!(@convert r, $s),]
                   $($t)*
                ]
            }
        }
    };
    (@parse $in_dim:expr, $out_dim:expr, [$($stack:tt)*] $r:expr, $($t:tt)*) => {
        match $r {
            r => {
                $crate::foundation::slicing::s![@parse
                   ::ndarray::SliceNextDim::next_in_dim(&r, $in_dim),
                   ::ndarray::SliceNextDim::next_out_dim(&r, $out_dim),
                   [$($stack)* $crate::foundation::slicing::s!(@convert r),]
                   $($t)*
                ]
            }
        }
    };
    (@parse $($t:tt)*) => { compile_error!("Invalid syntax in s![] call.") };
    (@convert $r:expr) => {
        <::ndarray::SliceInfoElem as ::core::convert::From<_>>::from($r)
    };
    (@convert $r:expr, $s:expr) => {
        <::ndarray::SliceInfoElem as ::core::convert::From<_>>::from(
            <::ndarray::Slice as ::core::convert::From<_>>::from($r).step_by($s as isize)
        )
    };
    ($($t:tt)*) => {
        {
            let (indices, in_dim, out_dim) = $crate::foundation::slicing::s![@parse
                ::core::marker::PhantomData::<::ndarray::Ix0>,
                ::core::marker::PhantomData::<::ndarray::Ix0>,
                []
                $($t)*
            ];
            $crate::foundation::slicing::slice_info(indices, in_dim, out_dim)
        }
    };
);

pub(crate) use s;

#[cfg(test)]
mod tests {
    use ndarray::{Array2, Array3, Axis, Slice};

    #[test]
    fn slices_like_ndarray() {
        let a = Array2::from_shape_fn((6, 5), |(i, j)| (10 * i + j) as f64);
        assert_eq!(
            a.slice(s![1..4, ..]),
            a.slice_axis(Axis(0), Slice::from(1..4))
        );
        assert_eq!(
            a.slice(s![.., 2..;2]),
            a.slice_axis(Axis(1), Slice::from(2..).step_by(2))
        );
        assert_eq!(
            a.slice(s![..;-1, 3]),
            a.column(3).slice_axis(Axis(0), Slice::from(..).step_by(-1))
        );
        let b = Array3::<u8>::zeros((4, 3, 2));
        assert_eq!(b.slice(s![1..2, .., ..]).dim(), (1usize, 3usize, 2usize));
        assert_eq!(b.slice(s![.., 1, ..]).dim(), (4usize, 2usize));
    }
}
