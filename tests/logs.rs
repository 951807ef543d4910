//! `--log-format json`: every stderr line of a command is one JSON object, and a backup,
//! a restore (done or failed), a backup job's run (done or failed) and a refused peer each
//! give one line with their fields, for log shippers. Plain text stays as it was: a
//! one-shot command logs nothing. Loopback only; every wait is bounded.

use std::time::Duration;

use anyhow::bail;
use cairn::mesh::{scenario, utf8, wait_for, Mesh};
use cairn::{random_bytes, write, Site};
use serde_json::Value;

/// Every non-empty line of `stderr` parsed as JSON; a line that is not fails the test.
fn json_lines(stderr: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// The one line whose fields.operation is `operation`.
fn the_line<'a>(lines: &'a [Value], operation: &str) -> &'a Value {
    let found: Vec<&Value> = lines
        .iter()
        .filter(|l| l["fields"]["operation"] == operation)
        .collect();
    assert_eq!(found.len(), 1, "one {operation} line in {lines:?}");
    &found[0]["fields"]
}

#[test]
fn a_backup_and_a_restore_each_log_one_json_line() {
    let site = Site::new();
    let source = site.path("fileserver.img");
    write(&source, &random_bytes(1 << 20, 7));
    let backup = site.run(&[
        "--log-format",
        "json",
        "backup",
        "fileserver",
        source.to_str().unwrap(),
    ]);
    assert!(backup.status.success(), "{backup:?}");
    let lines = json_lines(&backup.stderr);
    let fields = the_line(&lines, "backup");
    assert_eq!(fields["image"], "fileserver");
    assert_eq!(fields["bytes"], 1 << 20);
    assert_eq!(fields["result"], "ok");
    assert!(fields["duration_ms"].is_u64(), "{fields}");
    let snapshot = fields["snapshot"]
        .as_str()
        .expect("a snapshot id")
        .to_owned();
    assert!(snapshot.len() >= 8, "{snapshot}");

    let out = site.path("restored.img");
    let restore = site.run(&[
        "restore",
        "fileserver",
        out.to_str().unwrap(),
        "--log-format",
        "json",
    ]);
    assert!(restore.status.success(), "{restore:?}");
    let lines = json_lines(&restore.stderr);
    let fields = the_line(&lines, "restore");
    assert_eq!(fields["image"], "fileserver");
    assert_eq!(fields["snapshot"], snapshot.as_str());
    assert_eq!(fields["bytes"], 1 << 20);
    assert_eq!(fields["result"], "ok");
    assert!(fields["duration_ms"].is_u64(), "{fields}");

    // A failed restore: its line says why, and the error line is JSON too.
    let missing = site.run(&[
        "--log-format",
        "json",
        "restore",
        "mailserver",
        site.path("mail.img").to_str().unwrap(),
    ]);
    assert!(!missing.status.success());
    let lines = json_lines(&missing.stderr);
    let fields = the_line(&lines, "restore");
    assert_eq!(fields["image"], "mailserver");
    assert_eq!(fields["result"], "failed");
    assert!(
        fields["reason"]
            .as_str()
            .is_some_and(|r| r.contains("mailserver")),
        "{fields}"
    );
    let last = lines.last().expect("an error line");
    assert_eq!(last["level"], "ERROR");
    assert!(last["fields"]["message"]
        .as_str()
        .unwrap()
        .starts_with("error: "));
}

#[test]
fn plain_text_commands_log_nothing_of_their_own() {
    let site = Site::new();
    let source = site.path("small.img");
    write(&source, &random_bytes(4096, 3));
    let backup = site.run(&["backup", "small", source.to_str().unwrap()]);
    assert!(backup.status.success(), "{backup:?}");
    assert_eq!(String::from_utf8_lossy(&backup.stderr), "");
}

#[test]
fn a_refused_stranger_gives_one_json_line_with_peer_and_reason() {
    scenario("logs-refusal", |root, step| {
        let mesh = Mesh::build_with(
            root,
            1,
            1,
            &mut |node| node.extra_args = vec!["--log-format".into(), "json".into()],
            step,
        )?;
        let node = mesh.nodes().next().expect("one node");
        let mut stranger = mesh.stranger("stranger", "Nobody & Co")?;
        stranger.start(&[node.address()])?;
        step("the stranger dials the node");
        wait_for(
            Duration::from_secs(30),
            "the node to refuse the stranger",
            || Ok(node.log_text().contains("\"refusal\"")),
        )?;
        let lines = json_lines(node.log_text().as_bytes());
        let refusals: Vec<&Value> = lines
            .iter()
            .filter(|l| l["fields"]["operation"] == "refusal")
            .collect();
        let Some(first) = refusals.first() else {
            bail!("no refusal line");
        };
        let fields = &first["fields"];
        if fields["result"] != "refused"
            || !fields["peer"].is_string()
            || fields["reason"].as_str().is_none_or(str::is_empty)
        {
            bail!("the refusal line lacks its fields: {fields}");
        }
        Ok(())
    });
}

#[test]
fn a_jobs_run_gives_one_json_line_done_or_failed() {
    scenario("logs-jobs", |root, step| {
        let image = root.join("fs.img");
        write(&image, &random_bytes(1 << 20, 5));
        let config = format!(
            "[[backup]]\nimage = \"fs\"\nsource = \"{}\"\nschedule = \"daily 02:00\"\n\
             [[backup]]\nimage = \"db\"\nsource_command = \"echo dump failed >&2; exit 4\"\nschedule = \"daily 02:00\"\n",
            utf8(&image)?
        );
        let mut mesh = Mesh::build_with(
            root,
            1,
            1,
            &mut |node| node.extra_args = vec!["--log-format".into(), "json".into()],
            step,
        )?;
        let node = &mut mesh.sites[0][0];
        node.stop();
        std::fs::write(node.data_dir.join("node.toml"), config)?;
        node.start(&[])?;
        step("the node runs both jobs once at start (never run before)");
        let job_lines = |image: &str| -> Vec<Value> {
            json_lines(node.log_text().as_bytes())
                .into_iter()
                .filter(|l| l["fields"]["operation"] == "backup" && l["fields"]["image"] == image)
                .map(|l| l["fields"].clone())
                .collect()
        };
        wait_for(Duration::from_secs(60), "both jobs' lines", || {
            Ok(!job_lines("fs").is_empty() && !job_lines("db").is_empty())
        })?;
        let fs = &job_lines("fs")[0];
        if fs["result"] != "ok"
            || fs["job"] != true
            || fs["bytes"] != 1 << 20
            || !fs["duration_ms"].is_u64()
            || fs["snapshot"].as_str().is_none_or(|s| s.len() < 8)
        {
            bail!("the job's backup line lacks its fields: {fs}");
        }
        let db = &job_lines("db")[0];
        if db["result"] != "failed"
            || db["job"] != true
            || !db["duration_ms"].is_u64()
            || !db["reason"]
                .as_str()
                .is_some_and(|r| r.contains("exit status: 4") && r.contains("dump failed"))
        {
            bail!("the failed job's line lacks its fields: {db}");
        }
        Ok(())
    });
}
