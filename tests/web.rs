//! The status page and the DR report as a person sees them: a mesh of three offices on
//! loopback, the page of office A's node loaded in headless Chromium (Debian's package,
//! installed by .ci/run) with its DOM read after the page's script ran, and the report's
//! HTML file rendered the same way. Stopping office C's node must show: the image's copy
//! count drops on the page, and the report names the gap.
//!
//! The Chromium flags are those this closed network needs (no background fetches, no
//! component updates, a throwaway profile). A screenshot of each page is kept in a
//! directory printed in the output (CAIRN_TEST_ARTIFACTS, else the system temp dir).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cairn::mesh::{free_port, make_image, scenario, utf8, wait_at_r, wait_for, Mesh, Node};

/// How long one Chromium run may take before it is killed.
const BROWSER_LIMIT: Duration = Duration::from_secs(60);

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser"].iter().find_map(|name| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        })
    })
}

/// Loads `url` in headless Chromium and returns the DOM after its scripts ran; with
/// `screenshot`, also writes the page as a PNG there.
fn browse(browser: &Path, url: &str, screenshot: Option<&Path>) -> Result<String> {
    let profile = tempfile::tempdir()?;
    let mut command = Command::new(browser);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--window-size=1280,1400",
            "--virtual-time-budget=4000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    match screenshot {
        Some(path) => command.arg(format!("--screenshot={}", path.display())),
        None => command.arg("--dump-dom"),
    };
    let mut child = command.arg(url).spawn().context("start chromium")?;
    let deadline = Instant::now() + BROWSER_LIMIT;
    let mut stdout = child.stdout.take().context("chromium's stdout")?;
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut text);
        text
    });
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("chromium did not finish {url} within {BROWSER_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(reader.join().unwrap_or_default())
}

/// The text of the images table's row for `image` ("" when absent), tags stripped.
fn image_row(dom: &str, image: &str) -> String {
    let start = format!("<tr data-image=\"{image}\">");
    let Some(at) = dom.find(&start) else {
        return String::new();
    };
    let row = &dom[at..];
    let row = &row[..row.find("</tr>").unwrap_or(row.len())];
    text_of(row)
}

/// Markup to text: tags become " | " separators.
fn text_of(html: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => {
                in_tag = true;
                if !out.ends_with(" | ") {
                    out.push_str(" | ");
                }
            }
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out
}

fn artifacts_dir() -> PathBuf {
    let dir = std::env::var_os("CAIRN_TEST_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("cairn-web-artifacts"));
    std::fs::create_dir_all(&dir).expect("the artifacts dir");
    dir
}

fn report_json(node: &Node, unseen_after: &str) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&node.ok(&[
        "report",
        "--json",
        "--unseen-after",
        unseen_after,
    ])?)?)
}

#[test]
fn the_page_and_the_report_show_a_partner_stopping() {
    let Some(browser) = chromium() else {
        cairn::linux::tools_or_skip("the status page test", &["chromium".into()]);
        return;
    };
    scenario("web", |root, step| {
        let web_port = free_port();
        let mut configure = |node: &mut Node| {
            if node.site == 0 {
                node.extra_args = vec!["--web".into(), format!("127.0.0.1:{web_port}")];
            }
        };
        let mut mesh = Mesh::build_with(root, 3, 1, &mut configure, step)?;
        let image = make_image(root, "accounting.img", 6, 11);
        mesh.sites[0][0].ok(&["backup", "accounting", utf8(&image)?])?;
        wait_at_r(&mesh.sites[0][0], "accounting", 120)?;
        step("A backed up accounting, at R = 3 sites");

        // A restore that must fetch: A's packs damaged, so every chunk comes from B and
        // C, and A's node measures what each delivered.
        mesh.sites[0][0].stop();
        let damaged = mesh.sites[0][0].corrupt_packs()?;
        ensure!(damaged > 0, "A's packs hold chunks to damage");
        let outside = mesh.addresses_outside(0);
        mesh.sites[0][0].start(&outside)?;
        let out = root.join("restored.img");
        wait_for(Duration::from_secs(90), "a restore from B and C", || {
            Ok(mesh.sites[0][0]
                .run(&["restore", "accounting", utf8(&out)?, "--force"])
                .status
                .success())
        })?;
        ensure!(
            std::fs::read(&out)? == std::fs::read(&image)?,
            "the restore from the partners equals the image"
        );
        let report = report_json(&mesh.sites[0][0], "1d")?;
        let measured: Vec<&str> = report["partners"]
            .as_array()
            .context("partners")?
            .iter()
            .filter(|p| p["bytes_per_sec"].as_u64().is_some_and(|r| r > 0))
            .filter_map(|p| p["site_name"].as_str())
            .collect();
        ensure!(
            !measured.is_empty(),
            "no partner's throughput measured: {report:#}"
        );
        step(&format!(
            "restored from the mesh; throughput measured from {measured:?}"
        ));

        // Kept over a restart: the figures are in the index.
        mesh.sites[0][0].stop();
        let outside = mesh.addresses_outside(0);
        mesh.sites[0][0].start(&outside)?;
        let report = report_json(&mesh.sites[0][0], "1d")?;
        let image_report = &report["images"][0];
        ensure!(
            image_report["rto_full"]["ms"].as_u64().is_some(),
            "after a restart the full restore is still estimated: {image_report:#}"
        );
        step("the figures survive a restart");

        let page = format!("http://127.0.0.1:{web_port}/");
        let artifacts = artifacts_dir();
        let mut row = String::new();
        wait_for(
            Duration::from_secs(60),
            "the page to show 3 of 3 sites",
            || {
                row = image_row(&browse(&browser, &page, None)?, "accounting");
                Ok(row.contains("3 of 3 sites"))
            },
        )
        .with_context(|| format!("the row read: {row:?}"))?;
        browse(&browser, &page, Some(&artifacts.join("status-page.png")))?;
        step(&format!("the page shows accounting: {row}"));

        mesh.sites[2][0].stop();
        step("C stopped");
        wait_for(
            Duration::from_secs(90),
            "the page to show 2 of 3 sites",
            || {
                row = image_row(&browse(&browser, &page, None)?, "accounting");
                Ok(row.contains("2 of 3 sites"))
            },
        )
        .with_context(|| format!("the row read: {row:?}"))?;
        browse(
            &browser,
            &page,
            Some(&artifacts.join("status-page-c-stopped.png")),
        )?;
        step(&format!("with C stopped the page shows: {row}"));

        let html = root.join("report.html");
        let text =
            mesh.sites[0][0].ok(&["report", "--html", utf8(&html)?, "--unseen-after", "2s"])?;
        for needle in ["RPO", "RTO full", "partner Office C unseen for"] {
            ensure!(text.contains(needle), "{needle:?} in the report:\n{text}");
        }
        let url = format!("file://{}", utf8(&html)?);
        let dom = browse(&browser, &url, None)?;
        let seen = text_of(&dom);
        for needle in [
            "Disaster-recovery report: Office A",
            "RPO",
            "RTO, full restore",
            "RTO, stand-in boot",
            "partner Office C unseen for",
            "accounting: only 2 sites hold the newest snapshot",
            "accounting: no drill recorded",
        ] {
            ensure!(
                seen.contains(needle),
                "{needle:?} in the rendered report:\n{seen}"
            );
        }
        ensure!(dom.matches("<svg").count() >= 2, "the report's plots");
        let shot = artifacts.join("report.png");
        browse(&browser, &url, Some(&shot))?;
        ensure!(
            std::fs::metadata(&shot)?.len() > 0,
            "a screenshot of the report"
        );
        eprintln!("screenshots in {}", artifacts.display());
        Ok(())
    });
}
