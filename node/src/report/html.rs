//! `cairn report --html FILE`: the report as one self-contained, printable HTML file:
//! inline CSS, plots as inline SVG drawn by plotters, a drill's screenshot as an inline
//! PNG. Nothing in it fetches from the network, so it opens the same on a laptop in a
//! building with no connection, and prints on A4.

use std::fmt::Write as _;

use base64::Engine as _;
use plotters::prelude::*;
use thiserror::Error;

use super::{or_dash, ImageReport, Report};
use crate::status;
use crate::units;

const PLOT_WIDTH_PX: u32 = 640;
const PLOT_HEIGHT_PX: u32 = 220;
/// A screenshot larger than this is linked by path, not inlined.
const SCREENSHOT_INLINE_BYTES_MAX: u64 = 4 << 20;

#[derive(Debug, Error)]
#[error("cannot draw the plot {what}: {why}")]
pub struct PlotError {
    what: &'static str,
    why: String,
}

fn plot_error<E: std::fmt::Debug>(what: &'static str) -> impl Fn(E) -> PlotError {
    move |e| PlotError {
        what,
        why: format!("{e:?}"),
    }
}

/// Text for HTML: `<`, `>`, `&` and quotes escaped.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

/// The RPO an image had over time, in hours: it grows from each snapshot until the
/// next one and ends now. Snapshot times stand for the times they reached R, which are
/// not kept; so the plot shows the RPO the schedule achieved, the figure above it the
/// one in force now.
pub fn rpo_plot(image: &ImageReport, now_unix_ms: u64) -> Result<String, PlotError> {
    let times = &image.snapshot_times_unix_ms;
    let mut svg = String::new();
    {
        let root =
            SVGBackend::with_string(&mut svg, (PLOT_WIDTH_PX, PLOT_HEIGHT_PX)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error("RPO"))?;
        let start = times.first().copied().unwrap_or(now_unix_ms);
        let hours_ago = |t: u64| -(now_unix_ms.saturating_sub(t) as f64 / 3_600_000.0);
        let mut points: Vec<(f64, f64)> = Vec::new();
        for pair in times.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            points.push((hours_ago(a), 0.0));
            points.push((hours_ago(b), b.saturating_sub(a) as f64 / 3_600_000.0));
        }
        if let Some(&last) = times.last() {
            points.push((hours_ago(last), 0.0));
            points.push((0.0, now_unix_ms.saturating_sub(last) as f64 / 3_600_000.0));
        }
        let y_max = points
            .iter()
            .map(|p| p.1)
            .chain(image.schedule_period_ms.map(|p| p as f64 / 3_600_000.0))
            .fold(0.01, f64::max)
            * 1.15;
        let x_min = hours_ago(start).min(-0.01);
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("RPO of {} over time (hours)", image.image),
                ("sans-serif", 16),
            )
            .margin(8)
            .x_label_area_size(32)
            .y_label_area_size(48)
            .build_cartesian_2d(x_min..0.0, 0.0..y_max)
            .map_err(plot_error("RPO"))?;
        chart
            .configure_mesh()
            .x_desc("hours ago")
            .y_desc("RPO (h)")
            .x_label_formatter(&|x| format!("{:.1}", -x))
            .draw()
            .map_err(plot_error("RPO"))?;
        chart
            .draw_series(LineSeries::new(points, BLUE.stroke_width(2)))
            .map_err(plot_error("RPO"))?;
        if let Some(period) = image.schedule_period_ms {
            let h = period as f64 / 3_600_000.0;
            chart
                .draw_series(LineSeries::new([(x_min, h), (0.0, h)], RED.stroke_width(1)))
                .map_err(plot_error("RPO"))?
                .label("schedule's period");
        }
        root.present().map_err(plot_error("RPO"))?;
    }
    Ok(svg)
}

/// Restore throughput each partner delivered recently, one bar per partner (MiB/s).
pub fn throughput_plot(report: &Report) -> Result<String, PlotError> {
    let bars: Vec<(String, f64)> = report
        .partners
        .iter()
        .map(|p| {
            (
                status::printable(&p.site_name),
                p.bytes_per_sec.unwrap_or(0) as f64 / f64::from(1 << 20),
            )
        })
        .collect();
    let mut svg = String::new();
    {
        let root =
            SVGBackend::with_string(&mut svg, (PLOT_WIDTH_PX, PLOT_HEIGHT_PX)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error("throughput"))?;
        let y_max = bars.iter().map(|b| b.1).fold(0.01, f64::max) * 1.15;
        // Segments of 0..last are last + 1 slots: one per partner (two at least).
        let last = (bars.len().max(2) - 1) as u32;
        let mut chart = ChartBuilder::on(&root)
            .caption("Restore throughput per partner (MiB/s)", ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(32)
            .y_label_area_size(48)
            .build_cartesian_2d((0u32..last).into_segmented(), 0.0..y_max)
            .map_err(plot_error("throughput"))?;
        let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .y_desc("MiB/s")
            .x_labels(bars.len().max(1))
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => names.get(*i as usize).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .draw()
            .map_err(plot_error("throughput"))?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, (_, rate))| {
                let i = i as u32;
                Rectangle::new(
                    [
                        (SegmentValue::Exact(i), 0.0),
                        (SegmentValue::Exact(i + 1), *rate),
                    ],
                    BLUE.mix(0.6).filled(),
                )
            }))
            .map_err(plot_error("throughput"))?;
        root.present().map_err(plot_error("throughput"))?;
    }
    Ok(svg)
}

const CSS: &str = "
body { font-family: sans-serif; margin: 2em; color: #111; max-width: 60em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.5em; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #999; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #eee; }
.gaps li { color: #a00; }
.ok { color: #060; }
section { page-break-inside: avoid; }
img.screenshot { max-width: 100%; border: 1px solid #999; }
@media print { body { margin: 0; } section, svg, table { page-break-inside: avoid; } }
";

/// The whole report as one HTML document.
pub fn render(report: &Report) -> Result<String, PlotError> {
    let mut out = String::new();
    let w = &mut out;
    let site = escape(&report.site_name);
    let when = units::utc(report.generated_unix_ms);
    let _ = write!(
        w,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>Disaster-recovery report: {site}</title><style>{CSS}</style></head><body>\n\
         <h1>Disaster-recovery report: {site}</h1>\n\
         <p>Site {} &middot; made {when} UTC by cairn{}</p>\n",
        escape(&report.site_id),
        if report.node_running {
            ""
        } else {
            " from the data dir (the node was not running)"
        }
    );
    let _ = write!(w, "<section id=\"gaps\"><h2>Gaps</h2>");
    if report.gaps.is_empty() {
        let _ = write!(w, "<p class=\"ok\">No gap found.</p>");
    } else {
        let _ = write!(w, "<ul class=\"gaps\">");
        for gap in &report.gaps {
            let _ = write!(w, "<li>{}</li>", escape(gap));
        }
        let _ = write!(w, "</ul>");
    }
    let _ = writeln!(w, "</section>");
    let _ = write!(
        w,
        "<section id=\"summary\"><h2>Summary</h2><table><tr><th>Image</th><th>RPO</th>\
         <th>Schedule</th><th>Copies (sites with the newest snapshot)</th><th>RTO full restore</th>\
         <th>RTO stand-in boot</th><th>Last drill</th></tr>"
    );
    for image in &report.images {
        let _ = write!(
            w,
            "<tr><td>{}</td><td>{} ({})</td><td>{}</td><td>{} of {}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&image.image),
            or_dash(image.rpo_ms),
            escape(&image.rpo_compliance),
            escape(image.schedule.as_deref().unwrap_or("none")),
            image.sites_with_newest,
            image.replication_target,
            or_dash(image.rto_full.ms),
            or_dash(image.rto_boot.ms),
            image.last_drill.as_ref().map_or("no drill recorded".into(), |d| format!(
                "{} UTC, {}",
                units::utc(d.when_unix_ms),
                if d.passed { "passed" } else { "failed" }
            ))
        );
    }
    let _ = writeln!(w, "</table></section>");
    for image in &report.images {
        image_section(w, image, report.generated_unix_ms)?;
    }
    let _ = write!(
        w,
        "<section id=\"partners\"><h2>Partners</h2><table><tr><th>Partner</th>\
         <th>Last seen</th><th>Restore throughput</th><th>Measured over</th></tr>"
    );
    for p in &report.partners {
        let _ = write!(
            w,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{} in {} samples</td></tr>",
            escape(&p.site_name),
            p.last_seen_unix_ms.map_or("never".into(), |t| format!(
                "{} UTC ({} ago)",
                units::utc(t),
                status::duration(report.generated_unix_ms.saturating_sub(t))
            )),
            p.bytes_per_sec
                .map_or("not measured".into(), |r| format!("{}/s", units::bytes(r))),
            units::bytes(p.fetched_bytes),
            p.samples
        );
    }
    let _ = write!(
        w,
        "</table>{}</section>\n</body></html>\n",
        throughput_plot(report)?
    );
    Ok(out)
}

fn image_section(w: &mut String, image: &ImageReport, now: u64) -> Result<(), PlotError> {
    let name = escape(&image.image);
    let _ = write!(
        w,
        "<section id=\"image-{name}\"><h2>Image {name}</h2><table>\
         <tr><th>RPO</th><td>{} ({}); newest snapshot at R sites: {}</td></tr>\
         <tr><th>Schedule</th><td>{}</td></tr>\
         <tr><th>Size</th><td>{} on disk, {} stored</td></tr>\
         <tr><th>Copies per site</th><td>{}</td></tr>\
         <tr><th>RTO, full restore</th><td>{}: {}</td></tr>\
         <tr><th>RTO, stand-in boot</th><td>{}: {}</td></tr>\
         <tr><th>Retention</th><td>{}</td></tr>\
         <tr><th>Last drill</th><td>{}</td></tr></table>",
        or_dash(image.rpo_ms),
        escape(&image.rpo_compliance),
        image
            .newest_at_r_unix_ms
            .map_or("none".into(), |t| format!("{} UTC", units::utc(t))),
        escape(&match (&image.schedule, image.schedule_period_ms) {
            (Some(s), Some(p)) => format!("{s} (every {})", status::duration(p)),
            _ => "no backup job".into(),
        }),
        units::bytes(image.size_bytes),
        units::bytes(image.stored_bytes),
        escape(
            &image
                .copies
                .iter()
                .map(|c| format!(
                    "{}: {} chunks, {}",
                    c.site_name,
                    c.chunks,
                    units::bytes(c.bytes)
                ))
                .collect::<Vec<_>>()
                .join("; ")
        ),
        or_dash(image.rto_full.ms),
        escape(&image.rto_full.basis),
        or_dash(image.rto_boot.ms),
        escape(&image.rto_boot.basis),
        escape(&image.retention),
        drill_cell(image),
    );
    let _ = writeln!(w, "{}</section>", rpo_plot(image, now)?);
    Ok(())
}

fn drill_cell(image: &ImageReport) -> String {
    let Some(d) = &image.last_drill else {
        return "no drill recorded".into();
    };
    let mut cell = format!(
        "{} UTC, snapshot {}, {} in {}",
        units::utc(d.when_unix_ms),
        escape(&d.snapshot),
        if d.passed { "passed" } else { "failed" },
        status::duration(d.took_ms)
    );
    for failure in &d.failed {
        let _ = write!(cell, "<br>{}", escape(failure));
    }
    if let Some(path) = &d.screenshot {
        let small = std::fs::metadata(path).is_ok_and(|m| m.len() <= SCREENSHOT_INLINE_BYTES_MAX);
        match std::fs::read(path).ok().filter(|_| small) {
            Some(png) => {
                let _ = write!(
                    cell,
                    "<br><img class=\"screenshot\" alt=\"the display at the end of the drill's boot\" src=\"data:image/png;base64,{}\">",
                    base64::engine::general_purpose::STANDARD.encode(png)
                );
            }
            None => {
                let _ = write!(
                    cell,
                    "<br>screenshot: {}",
                    escape(&path.display().to_string())
                );
            }
        }
    }
    cell
}
