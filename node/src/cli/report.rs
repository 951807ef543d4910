//! `cairn report [--html FILE] [--json]`: gathers the facts (`node::report_facts`, the
//! snapshots, the drills), builds the report (`crate::report`) and prints or writes it.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use super::{node, print_json, remote};
use crate::report;
use crate::status::{self, CheckLimits, NodeStatus};
use crate::vault::Vault;

pub(super) fn run(
    io: &remote::Caller,
    in_node: Option<&remote::InNode>,
    vault: &Vault,
    data_dir: &Path,
    html: Option<PathBuf>,
    json: bool,
    unseen_after_ms: Option<u64>,
) -> Result<u8> {
    let (_, built) = gather(in_node, vault, data_dir, unseen_after_ms)?;
    if let Some(path) = &html {
        let page = report::html::render(&built)?;
        crate::datadir::write_durable(path, page.as_bytes())
            .with_context(|| format!("cannot write the report to {}", path.display()))?;
    }
    if json {
        print_json(io, &built);
    } else {
        outln!(io, "{}", report::render_text(&built).trim_end());
        if let Some(path) = &html {
            outln!(io, "\nreport written to {}", path.display());
        }
    }
    Ok(0)
}

/// What the status page's `/api/v1/status` answers: the status and the report, made
/// once, as `cairn status --json` and `cairn report --json` print them.
pub(super) fn page_facts(in_node: &remote::InNode) -> Result<serde_json::Value> {
    let (status, report) = gather(
        Some(in_node),
        &in_node.vault,
        in_node.vault.dir.root(),
        None,
    )?;
    Ok(serde_json::json!({ "status": status, "report": report }))
}

/// The node's status and the report built from it.
fn gather(
    in_node: Option<&remote::InNode>,
    vault: &Vault,
    data_dir: &Path,
    unseen_after_ms: Option<u64>,
) -> Result<(NodeStatus, report::Report)> {
    let (node_status, retention) = node::report_facts(data_dir, vault, in_node.map(|n| &n.mesh))?;
    let snapshots = vault.snapshots()?;
    let newest_at_r = status::newest_at_r(vault)?;
    let drills = report::drills(vault);
    let limits = CheckLimits {
        partner_unseen_ms: unseen_after_ms.unwrap_or(CheckLimits::default().partner_unseen_ms),
        ..CheckLimits::default()
    };
    let built = report::build(&report::Input {
        status: &node_status,
        node_running: in_node.is_some(),
        snapshots: &snapshots,
        newest_at_r: &newest_at_r,
        retention: &retention,
        drills: &drills,
        limits,
    });
    Ok((node_status, built))
}
