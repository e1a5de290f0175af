//! SIGINT and SIGTERM during a run: the first one asks the run to stop at the
//! next safe point, the second one stops the process at once.
//!
//! A Ctrl-C and `systemctl stop` must both leave a clean, resumable state and
//! a report. So the first signal only sets a flag (in the handler itself, so
//! it is set before anything the signal caused elsewhere — the agent or ssh
//! dying from the same `systemctl stop` — can be seen); the sink loop and
//! every wait on the agent look at it within a fraction of a second (see
//! [`crate::transport::link`]), the run unwinds — a file still arriving is a temporary
//! entry, which a snapshot keeps for the next run to resume from and a
//! restore removes — and the command reports `interrupted by SIGTERM` with
//! its own exit code ([`crate::error::Code::Interrupted`]). If the unwinding
//! ever got stuck, a second signal runs the default action: the process dies
//! as `kill` would have killed it, which docs/design.md rule 5 makes safe too.
//!
//! The handlers are signal-hook's (`unsafe_code` is denied here); they are
//! installed only by the commands that look at the flag, so every other
//! command still dies on the first Ctrl-C.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use anyhow::{Context, Result};
use signal_hook::consts::{SIGINT, SIGTERM};

/// Set by the first signal: the next one runs the default action.
static ARMED: AtomicBool = AtomicBool::new(false);
/// The signal that asked the run to stop (0: none yet).
static RECEIVED: AtomicUsize = AtomicUsize::new(0);

/// A run stopped because it was asked to.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("interrupted by {}", signal_name(*.0))]
pub struct Interrupted(pub i32);

/// `SIGTERM`, `SIGINT`, or the number.
pub fn signal_name(signal: i32) -> String {
    signal_hook::low_level::signal_name(signal).map_or_else(|| format!("signal {signal}"), str::to_string)
}

/// Installs the handlers for SIGINT and SIGTERM, and a thread that says on
/// stderr what the first one does.
pub fn install() -> Result<()> {
    for signal in [SIGINT, SIGTERM] {
        // Order matters: the check of ARMED runs before the action that sets it.
        signal_hook::flag::register_conditional_default(signal, &ARMED)
            .with_context(|| format!("installing the handler of {}", signal_name(signal)))?;
        signal_hook::flag::register(signal, &ARMED)?;
        signal_hook::flag::register_usize(signal, &RECEIVED, signal as usize)?;
    }
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    std::thread::Builder::new()
        .name("rbackup-signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                crate::warn!(
                    "received {}: stopping at the next safe point (a second signal stops at once)",
                    signal_name(signal)
                );
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}

/// The signal that asked the run to stop, if one did.
pub fn received() -> Option<Interrupted> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(Interrupted(s as i32)),
    }
}

/// `Err` once a signal asked the run to stop.
pub fn check() -> Result<(), Interrupted> {
    received().map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_names_the_signal() {
        assert_eq!(Interrupted(SIGTERM).to_string(), "interrupted by SIGTERM");
        assert_eq!(Interrupted(SIGINT).to_string(), "interrupted by SIGINT");
    }
}
