//! Exit codes, defined once (documented in `docs/exit-codes.md`).
//!
//! Error policy: a command returns `Ok(code)` when it ran to its end — the
//! code says whether some entries had problems — and `Err` when it could not.
//! Errors that deserve their own code are typed ([`UsageError`],
//! [`LockedError`], [`crate::interrupt::Interrupted`]); everything else is a
//! plain error chain and exits 1.

use std::process::ExitCode;

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    /// Everything done.
    Ok,
    /// Done, but files changed or vanished while the run read them (normal on
    /// a live server; rsync's 24).
    Vanished,
    /// Done, but some entries could not be read or fully written (rsync's 23).
    Partial,
    /// `verify` found differences.
    Mismatch,
    /// The run failed; a snapshot in progress stays `.incomplete`.
    Error,
    /// SIGINT or SIGTERM stopped the run at a safe point; the `.incomplete`
    /// stays for `--continue` (rsync's 20).
    Interrupted,
    /// Bad command line or configuration; nothing was done.
    Usage,
    /// Another run holds the destination's lock; nothing was done.
    Locked,
}

impl Code {
    /// Every code, mildest first.
    pub const ALL: [Code; 8] = [
        Code::Ok,
        Code::Vanished,
        Code::Partial,
        Code::Mismatch,
        Code::Error,
        Code::Interrupted,
        Code::Usage,
        Code::Locked,
    ];

    /// The process exit status.
    pub fn status(self) -> u8 {
        match self {
            Code::Ok => 0,
            Code::Error => 1,
            Code::Interrupted => 20,
            Code::Usage => 2,
            Code::Mismatch => 3,
            Code::Partial => 23,
            Code::Vanished => 24,
            Code::Locked => 75,
        }
    }

    /// How bad a code is when several runs are summed up in one exit code
    /// (`--all`, see [`Code::worst`]). Not the enum's own order, which is the
    /// mail's threshold (`send_on`) and says how much a single run needs a
    /// human: summing up, a job that failed must not hide behind one that was
    /// merely skipped because another run was doing it (locked), and a
    /// stopped run (interrupted) is resumed by the next one, while a failed
    /// one is not. Documented in docs/exit-codes.md.
    pub fn severity(self) -> u8 {
        match self {
            Code::Ok => 0,
            Code::Locked => 1,
            Code::Vanished => 2,
            Code::Partial => 3,
            Code::Mismatch => 4,
            Code::Interrupted => 5,
            Code::Error => 6,
            Code::Usage => 7,
        }
    }

    /// The code of several runs: the most severe of theirs ([`Code::severity`]);
    /// `Ok` for none.
    pub fn worst(codes: impl IntoIterator<Item = Code>) -> Code {
        codes.into_iter().max_by_key(|c| c.severity()).unwrap_or(Code::Ok)
    }

    /// One upper-case word, for the one-line-per-job summary of `--all`.
    pub fn label(self) -> &'static str {
        match self {
            Code::Ok => "OK",
            Code::Vanished => "VANISHED",
            Code::Partial => "PARTIAL",
            Code::Mismatch => "MISMATCH",
            Code::Error => "FAILED",
            Code::Interrupted => "INTERRUPTED",
            Code::Usage => "CONFIG",
            Code::Locked => "LOCKED",
        }
    }

    /// The code of an exit status, if it is one of ours.
    pub fn from_status(status: i32) -> Option<Code> {
        Code::ALL.into_iter().find(|c| i32::from(c.status()) == status)
    }

    /// One word for reports and mail subjects.
    pub fn word(self) -> &'static str {
        match self {
            Code::Ok => "OK",
            Code::Vanished => "OK (files changed during the run)",
            Code::Partial => "PARTIAL",
            Code::Mismatch => "MISMATCH",
            Code::Error => "FAILED",
            Code::Interrupted => "INTERRUPTED",
            Code::Usage => "FAILED (configuration)",
            Code::Locked => "SKIPPED (locked)",
        }
    }
}

impl From<Code> for ExitCode {
    fn from(c: Code) -> ExitCode {
        ExitCode::from(c.status())
    }
}

/// A bad command line or configuration.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Another process holds the lock.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LockedError(pub String);

/// The exit code for an error that ended a command.
pub fn code_of(err: &anyhow::Error) -> Code {
    for cause in err.chain() {
        if cause.is::<UsageError>() {
            return Code::Usage;
        }
        if cause.is::<LockedError>() {
            return Code::Locked;
        }
        if cause.is::<crate::interrupt::Interrupted>() {
            return Code::Interrupted;
        }
    }
    Code::Error
}

/// Shorthand for returning a usage error.
#[macro_export]
macro_rules! usage {
    ($($arg:tt)*) => {
        anyhow::Error::new($crate::error::UsageError(format!($($arg)*)))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_errors_map_to_their_codes_through_context() {
        use anyhow::Context;
        let e: anyhow::Result<()> = Err(anyhow::Error::new(LockedError("held".into())));
        assert_eq!(code_of(&e.context("running backup").unwrap_err()), Code::Locked);
        assert_eq!(code_of(&usage!("bad {}", 1)), Code::Usage);
        assert_eq!(code_of(&anyhow::anyhow!("x")), Code::Error);
        let e = anyhow::Error::new(crate::interrupt::Interrupted(15)).context("backup from /srv stopped");
        assert_eq!(code_of(&e), Code::Interrupted);
    }

    #[test]
    fn the_worst_of_several_runs_follows_the_documented_order() {
        use Code::*;
        // docs/exit-codes.md: 2 > 1 > 20 > 3 > 23 > 24 > 75 > 0.
        let mildest_first = [Ok, Locked, Vanished, Partial, Mismatch, Interrupted, Error, Usage];
        for (i, a) in mildest_first.iter().enumerate() {
            for b in &mildest_first[i..] {
                assert_eq!(Code::worst([*a, *b]), *b, "{a:?} vs {b:?}");
                assert_eq!(Code::worst([*b, *a]), *b, "{b:?} vs {a:?}");
            }
        }
        assert_eq!(Code::worst([]), Ok);
        assert_eq!(Code::worst([Ok, Error, Locked, Partial]), Error);
        // A failed job is not hidden by one that was skipped for its lock.
        assert_eq!(Code::worst([Locked, Error]), Error);
        let mut severities: Vec<u8> = Code::ALL.iter().map(|c| c.severity()).collect();
        severities.sort_unstable();
        severities.dedup();
        assert_eq!(severities.len(), Code::ALL.len(), "every code has its own rank");
    }

    #[test]
    fn statuses_map_back_to_codes() {
        for c in Code::ALL {
            assert_eq!(Code::from_status(i32::from(c.status())), Some(c));
        }
        assert_eq!(Code::from_status(101), None);
    }

    #[test]
    fn codes_are_distinct() {
        let all = Code::ALL;
        let mut seen: Vec<u8> = all.iter().map(|c| c.status()).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), all.len());
    }
}
