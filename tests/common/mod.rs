//! Helpers shared by the integration tests: synthetic groups with known structure.
#![allow(dead_code)]

use fips::{Activation, Calibration, DenseMlp, Float, Linear, MlpKind};
use ndarray::{Array1, Array2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

pub fn randn<F: Float>(rng: &mut ChaCha8Rng, rows: usize, cols: usize, scale: f64) -> Array2<F> {
    Array2::from_shape_simple_fn((rows, cols), || {
        let z: f64 = StandardNormal.sample(rng);
        F::cast(scale * z)
    })
}

/// Shape of a synthetic group built on a shared dictionary.
#[derive(Debug, Clone, Copy)]
pub struct Dictionary {
    pub kind: MlpKind,
    pub activation: Activation,
    pub d: usize,
    pub i: usize,
    pub n: usize,
    pub atoms: usize,
    pub density: f64,
    pub seed: u64,
}

/// A group whose matrices share an over-complete dictionary: every column of every oriented
/// weight `W_j` (`d × I`) is a sparse combination (`density`) of `atoms` shared atoms, plus a little
/// noise. This is the structure FiPS is built to find.
pub fn shared_dictionary_group<F: Float>(spec: Dictionary) -> Vec<DenseMlp<F>> {
    let Dictionary {
        kind,
        activation,
        d,
        i,
        n,
        atoms,
        density,
        seed,
    } = spec;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dictionary: Array2<f64> = randn(&mut rng, d, atoms, 1.0 / (d as f64).sqrt());
    let matrix = |rng: &mut ChaCha8Rng| -> Array2<F> {
        let codes = Array2::from_shape_simple_fn((atoms, i), || {
            if rng.random_bool(density) {
                let z: f64 = StandardNormal.sample(rng);
                z / (atoms as f64 * density).sqrt()
            } else {
                0.0
            }
        });
        let noise: Array2<f64> = randn(rng, d, i, 0.01 / (d as f64).sqrt());
        (dictionary.dot(&codes) + noise).mapv(F::cast)
    };
    (0..n)
        .map(|_| {
            let layers: Vec<Linear<F>> = kind
                .matrix_roles()
                .iter()
                .map(|role| {
                    let w = matrix(&mut rng);
                    let (w, bias_len) = match role {
                        fips::MatrixRole::Up => {
                            (w.reversed_axes().as_standard_layout().into_owned(), i)
                        }
                        fips::MatrixRole::Down => (w, d),
                    };
                    let bias = (kind == MlpKind::Standard).then(|| {
                        Array1::from_shape_simple_fn(bias_len, || {
                            let z: f64 = StandardNormal.sample(&mut rng);
                            F::cast(0.1 * z)
                        })
                    });
                    Linear::new(w, bias).expect("valid layer")
                })
                .collect();
            DenseMlp::from_layers(kind, layers, activation).expect("valid block")
        })
        .collect()
}

/// Gaussian calibration for `n` blocks (the i.i.d. draw differs per block).
pub fn gaussian_calibration<F: Float>(
    n: usize,
    tokens: usize,
    d: usize,
    seed: u64,
) -> Calibration<F> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Calibration::new((0..n).map(|_| randn(&mut rng, tokens, d, 1.0)).collect())
        .expect("valid calibration")
}

/// `‖Ŷ − Y‖ / ‖Y‖` summed over blocks, for blocks rebuilt by `rebuild`.
pub fn relative_error<F: Float>(
    originals: &[DenseMlp<F>],
    rebuilt: &[DenseMlp<F>],
    calibration: &Calibration<F>,
) -> f64 {
    let (mut e, mut n) = (0.0, 0.0);
    for (b, (orig, new)) in originals.iter().zip(rebuilt).enumerate() {
        let z = calibration.input(b).unwrap();
        let y = orig.forward(z).unwrap();
        let yhat = new.forward(z).unwrap();
        for (p, t) in yhat.iter().zip(y.iter()) {
            let (p, t) = (p.as_f64(), t.as_f64());
            e += (p - t) * (p - t);
            n += t * t;
        }
    }
    (e / n).sqrt()
}

/// The shared data directory: `$FIPS_DATA_DIR`, else `../shared/data` beside the crate.
pub fn shared_root() -> std::path::PathBuf {
    std::env::var_os("FIPS_DATA_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"))
}

/// `subdir` of the shared data directory when every file of `required` (relative to it) is
/// there; otherwise `None`, with a message on stderr naming the test and the missing file (shown
/// even when the harness captures output), so the caller can skip loudly.
pub fn shared_data(test: &str, subdir: &str, required: &[&str]) -> Option<std::path::PathBuf> {
    let dir = shared_root().join(subdir);
    match required.iter().find(|f| !dir.join(f).is_file()) {
        None => Some(dir),
        Some(missing) => {
            // Straight to the process's stderr: `eprintln!` would be captured by the test
            // harness and the skip would pass unseen.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: no {} (set FIPS_DATA_DIR to the shared data directory)",
                dir.join(missing).display()
            );
            None
        }
    }
}

/// The shared data directory when it holds the DeiT-tiny checkpoint (see [`shared_data`]).
pub fn data_dir(test: &str) -> Option<std::path::PathBuf> {
    shared_data(test, "deit-tiny", &["model.safetensors"]).map(|_| shared_root())
}

/// A fresh, empty scratch directory `fips-{tag}-{pid}` in the system's temporary directory.
pub fn scratch(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("fips-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `dir/report.json` without its timings (`*_seconds`, the only thing that differs between
/// identical runs).
pub fn report_without_timings(dir: &std::path::Path) -> serde_json::Value {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                map.retain(|k, _| !k.ends_with("_seconds"));
                map.values_mut().for_each(strip);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap();
    strip(&mut v);
    v
}
