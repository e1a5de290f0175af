//! After every run: the last-run summary beside the snapshots and the
//! Prometheus textfile, on success and on failure.

use std::ffi::OsStr;

use crate::common::*;

fn metric(text: &str, name: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("rbackup_{name}{{job=\"web\"}} ")))
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn every_run_leaves_a_summary_and_metrics() {
    require_root();
    let tmp = scratch();
    let src = tmp.path().join("src");
    write(&src.join("a/b.txt"), b"hello");
    write(&src.join("c.txt"), b"world");
    let metrics = tmp.path().join("textfile/rbackup_web.prom");
    std::fs::create_dir_all(metrics.parent().unwrap()).unwrap();
    let cfg = tmp.path().join("rbackup.toml");
    let write_cfg = |source: &std::path::Path| {
        std::fs::write(
            &cfg,
            format!(
                "[job.web]\nsource = \"{}\"\nbackups_folder = \"{}\"\nmetrics_file = \"{}\"\n",
                source.display(),
                tmp.path().join("bk").display(),
                metrics.display()
            ),
        )
        .unwrap();
    };
    write_cfg(&src);
    let rb = |args: &[&str]| {
        let mut all: Vec<&OsStr> = vec!["-c".as_ref(), cfg.as_os_str()];
        all.extend(args.iter().map(OsStr::new));
        run(&all)
    };

    let (code, _, err) = rb(&["--backup"]);
    assert_eq!(code, 0, "{err}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("bk/web.rbackup/last-run.json")).unwrap())
            .unwrap();
    assert_eq!(summary["job"], "web");
    assert_eq!(summary["result"], "ok");
    assert_eq!(summary["exit_code"], 0);
    let snapshot = summary["snapshot"].as_str().unwrap().to_string();
    assert!(tmp.path().join("bk").join(&snapshot).is_dir());
    assert_eq!(summary["stats"]["files"], 2);
    assert!(summary["start"].is_string() && summary["end"].is_string() && summary["last_success"].is_string());
    let text = std::fs::read_to_string(&metrics).unwrap();
    assert!(text.contains("# TYPE rbackup_last_success_timestamp_seconds gauge"), "{text}");
    let success = metric(&text, "last_success_timestamp_seconds");
    assert!(success > 1.7e9, "{text}");
    assert_eq!(metric(&text, "last_run_success"), 1.0);
    assert_eq!(metric(&text, "last_run_exit_code"), 0.0);
    assert_eq!(metric(&text, "last_run_files"), 2.0);
    assert_eq!(metric(&text, "snapshots"), 1.0);

    // A failed run: the result says so, the last success is remembered.
    write_cfg(&tmp.path().join("missing"));
    let (code, _, _) = rb(&["--backup"]);
    assert_eq!(code, 1);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("bk/web.rbackup/last-run.json")).unwrap())
            .unwrap();
    assert_eq!(summary["result"], "error");
    assert_eq!(summary["exit_code"], 1);
    assert!(summary["error"].as_str().unwrap().contains("cannot be read"), "{summary}");
    assert!(summary["snapshot"].is_null());
    assert!(summary["last_success"].is_string());
    let text = std::fs::read_to_string(&metrics).unwrap();
    assert_eq!(metric(&text, "last_run_success"), 0.0);
    assert_eq!(metric(&text, "last_run_exit_code"), 1.0);
    assert_eq!(metric(&text, "last_success_timestamp_seconds"), success);
    assert_eq!(metric(&text, "snapshots"), 1.0);
    // Written atomically: no temporary file is left beside it.
    assert_eq!(std::fs::read_dir(metrics.parent().unwrap()).unwrap().count(), 1);
}

/// Regression: the metrics file's folder wasn't created (the log file's was).
#[test]
fn the_metrics_files_folder_is_created() {
    require_root();
    let tmp = scratch();
    let src = tmp.path().join("src");
    write(&src.join("a"), b"a");
    let metrics = tmp.path().join("new/textfile/rbackup_web.prom");
    let cfg = tmp.path().join("rbackup.toml");
    std::fs::write(
        &cfg,
        format!(
            "[job.web]\nsource = \"{}\"\nbackups_folder = \"{}\"\nmetrics_file = \"{}\"\n",
            src.display(),
            tmp.path().join("bk").display(),
            metrics.display()
        ),
    )
    .unwrap();
    let (code, _, err) = run(&["-c".as_ref(), cfg.as_os_str(), "--backup".as_ref()]);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("could not write the metrics file"), "{err}");
    assert_eq!(metric(&std::fs::read_to_string(&metrics).unwrap(), "last_run_success"), 1.0);
}

/// Regression: with several jobs in one cron run, "warning: cannot read: …"
/// could not be told apart. Warnings and errors on stderr name their job.
#[test]
fn warnings_and_errors_on_stderr_name_their_job() {
    require_root();
    let tmp = scratch();
    let src = tmp.path().join("src");
    write(&src.join("a"), b"a");
    let cfg = tmp.path().join("rbackup.toml");
    std::fs::write(
        &cfg,
        format!(
            "[job.web]\nsource = \"{}\"\nbackups_folder = \"{}\"\n\n[job.mail]\nsource = \"{}\"\nbackups_folder = \"{}\"\n",
            src.display(),
            tmp.path().join("bk").display(),
            tmp.path().join("missing").display(),
            tmp.path().join("bk").display(),
        ),
    )
    .unwrap();
    let (code, _, err) = run(&["-c".as_ref(), cfg.as_os_str(), "-j".as_ref(), "mail".as_ref(), "--backup".as_ref()]);
    assert_eq!(code, 1, "{err}");
    let line = err.lines().find(|l| l.contains("cannot be read")).unwrap_or_else(|| panic!("{err}"));
    assert!(line.starts_with("mail: error: "), "{line}");
}
