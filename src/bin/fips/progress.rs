//! Progress bars for the long phases: decoding, calibration, training, evaluation.

use std::io::IsTerminal;
use std::ops::ControlFlow;

use fips::app::pipeline::Observer;
use fips::{MethodReport, Progress};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Creates progress bars on stderr. When stderr is not a terminal (a log file, a pipe, a batch
/// job) the bars are hidden and training progress is printed as plain lines instead: one per
/// tenth of each group's steps.
pub struct Bars;

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
}

impl Bars {
    pub fn new() -> Self {
        Self
    }

    /// A bar of `len` items labelled `message`.
    pub fn bar(&self, len: usize, message: &str) -> ProgressBar {
        let bar = ProgressBar::with_draw_target(Some(len as u64), ProgressDrawTarget::stderr());
        bar.set_style(style(
            "{msg:>18} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}",
        ));
        bar.set_message(message.to_string());
        bar
    }

    /// The observer of a compression run over `groups` groups.
    pub fn observer(&self, groups: usize) -> CompressionBars {
        CompressionBars {
            groups,
            bar: None,
            plain: !std::io::stderr().is_terminal(),
        }
    }

    /// Shows end-to-end distillation: a bar with the batch loss, or (stderr not a terminal) a
    /// line per tenth of the steps. Call with `(done, steps, loss)` after each step.
    pub fn distill_progress(&self) -> impl FnMut(usize, usize, f64) {
        let plain = !std::io::stderr().is_terminal();
        let mut bar: Option<ProgressBar> = None;
        move |done, steps, loss| {
            let tenth = steps.div_ceil(10).max(1);
            if plain && (done.is_multiple_of(tenth) || done == steps) {
                eprintln!("distilling: step {done}/{steps} loss {loss:.4}");
            }
            let b = bar.get_or_insert_with(|| {
                let b =
                    ProgressBar::with_draw_target(Some(steps as u64), ProgressDrawTarget::stderr());
                b.set_style(style(
                    "{prefix:>18} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta} {msg}",
                ));
                b.set_prefix("distilling");
                b
            });
            b.set_position(done as u64);
            b.set_message(format!("loss {loss:.4}"));
            if done == steps {
                b.finish_and_clear();
            }
        }
    }

    /// The observer of a classification pass.
    pub fn classify_observer(&self, label: &str) -> ClassifyBar {
        ClassifyBar {
            label: label.to_string(),
            bar: None,
        }
    }
}

/// Shows calibration and training progress of each group.
pub struct CompressionBars {
    groups: usize,
    bar: Option<ProgressBar>,
    /// Plain progress lines instead of bars (stderr is not a terminal).
    plain: bool,
}

impl CompressionBars {
    fn replace(&mut self, len: usize, template: &str, message: String) -> &ProgressBar {
        if let Some(old) = self.bar.take() {
            old.finish_and_clear();
        }
        let bar = ProgressBar::with_draw_target(Some(len as u64), ProgressDrawTarget::stderr());
        bar.set_style(style(template));
        bar.set_message(message);
        self.bar.insert(bar)
    }
}

impl Observer for CompressionBars {
    fn calibration(&mut self, group: usize, done: usize, total: usize) {
        if done == 0 {
            self.replace(
                total,
                "{msg:>18} [{bar:30}] {pos}/{len} {elapsed_precise}",
                format!("calib group {}/{}", group + 1, self.groups),
            );
        } else if let Some(bar) = &self.bar {
            bar.set_position(done as u64);
        }
    }

    fn group_started(&mut self, group: usize, blocks: &[usize], steps: usize) {
        let prefix = format!("group {}/{}", group + 1, self.groups);
        let bar = self.replace(
            steps,
            "{prefix:>18} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta} {msg}",
            format!("blocks {blocks:?}"),
        );
        bar.set_prefix(prefix);
    }

    fn step(&mut self, group: usize, p: &Progress) -> ControlFlow<()> {
        let tenth = p.total_steps.div_ceil(10).max(1);
        if self.plain && (p.step.is_multiple_of(tenth) || p.step == p.total_steps) {
            eprintln!(
                "group {}/{}: step {}/{} loss {:.3e} lr {:.1e}",
                group + 1,
                self.groups,
                p.step,
                p.total_steps,
                p.loss,
                p.learning_rate
            );
        }
        if let Some(bar) = &self.bar {
            bar.set_position(p.step as u64);
            if p.step.is_multiple_of(10) || p.step == p.total_steps {
                let mut message = format!("loss {:.3e} lr {:.1e}", p.loss, p.learning_rate);
                if let Some(s) = p.sparsity {
                    message.push_str(&format!(" sparsity {s:.3}"));
                }
                if let Some(a) = p.slope {
                    message.push_str(&format!(" slope {a:.3}"));
                }
                bar.set_message(message);
            }
        }
        ControlFlow::Continue(())
    }

    fn group_finished(&mut self, group: usize, report: &MethodReport) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        eprintln!(
            "group {}/{} ({}): kept {:.2}% of the weights, rel. error {:.4} in {:.1?}",
            group + 1,
            self.groups,
            report.method,
            100.0 * report.parameters.kept_fraction(),
            report.rel_error,
            report.wall_time
        );
    }

    fn group_reused(&mut self, group: usize, report: &MethodReport) {
        eprintln!(
            "group {}/{} ({}): finished by an earlier run with the same settings, reused \
             (kept {:.2}%, rel. error {:.4})",
            group + 1,
            self.groups,
            report.method,
            100.0 * report.parameters.kept_fraction(),
            report.rel_error
        );
    }
}

impl Drop for CompressionBars {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// Shows a classification pass.
pub struct ClassifyBar {
    label: String,
    bar: Option<ProgressBar>,
}

impl Observer for ClassifyBar {
    fn classification(&mut self, done: usize, total: usize) {
        let bar = self.bar.get_or_insert_with(|| {
            let bar =
                ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
            bar.set_style(style("{msg:>18} [{bar:30}] {pos}/{len} {elapsed_precise}"));
            bar.set_message(self.label.clone());
            bar
        });
        bar.set_position(done as u64);
        if done == total {
            bar.finish_and_clear();
        }
    }
}
