//! Each run's picture (SVG, with plotters): orders accepted and decided per second over the
//! run, the accept latency at every percentile, and the accept latency's p50 and p99 in each
//! second.

use std::path::Path;

use plotters::prelude::*;

use crate::report::{Report, Timeline};

pub fn draw(path: &Path, report: &Report, timeline: &Timeline) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1650, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let title = format!(
        "{:?} {} — {} orders, {} event(s): {:.0} end-to-end orders/s",
        report.scenario, report.label, report.orders, report.events, report.end_to_end_per_sec
    );
    let root = root.titled(&title, ("sans-serif", 18)).map_err(plot_error)?;
    let areas = root.split_evenly((1, 3));
    throughput(&areas[0], timeline)?;
    latency(&areas[1], timeline)?;
    latency_per_second(&areas[2], timeline)?;
    root.present().map_err(plot_error)?;
    Ok(())
}

fn throughput(area: &DrawingArea<SVGBackend, plotters::coord::Shift>, timeline: &Timeline) -> anyhow::Result<()> {
    let seconds = timeline.accepted_per_sec.len().max(timeline.decided_per_sec.len()).max(1);
    let top = timeline.accepted_per_sec.iter().chain(&timeline.decided_per_sec).copied().max().unwrap_or(1).max(1);
    let mut chart = ChartBuilder::on(area)
        .caption("orders per second", ("sans-serif", 15))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..seconds as f64, 0f64..top as f64 * 1.1)
        .map_err(plot_error)?;
    chart.configure_mesh().x_desc("seconds since the first request").y_desc("orders/s").draw().map_err(plot_error)?;
    // Each second's count is drawn at the second's middle.
    let series =
        |counts: &[u64]| counts.iter().enumerate().map(|(s, n)| (s as f64 + 0.5, *n as f64)).collect::<Vec<_>>();
    for (counts, label, color) in
        [(&timeline.accepted_per_sec, "accepted (202)", BLUE), (&timeline.decided_per_sec, "decided", RED)]
    {
        if counts.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(series(counts), color.stroke_width(2)))
            .map_err(plot_error)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(plot_error)?;
    Ok(())
}

fn latency(area: &DrawingArea<SVGBackend, plotters::coord::Shift>, timeline: &Timeline) -> anyhow::Result<()> {
    let top = timeline.accept_latency_ms.iter().map(|(_, ms)| *ms).fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption("accept latency", ("sans-serif", 15))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..100f64, 0f64..top * 1.1)
        .map_err(plot_error)?;
    chart.configure_mesh().x_desc("percentile").y_desc("milliseconds").draw().map_err(plot_error)?;
    chart
        .draw_series(LineSeries::new(timeline.accept_latency_ms.iter().copied(), BLUE.stroke_width(2)))
        .map_err(plot_error)?;
    Ok(())
}

/// Each second's p50 and p99, drawn at the second's middle (a second without an accepted
/// request breaks the line).
fn latency_per_second(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    timeline: &Timeline,
) -> anyhow::Result<()> {
    let seconds = &timeline.accept_p50_p99_ms_per_sec;
    let top = seconds.iter().flatten().map(|(_, p99)| *p99).fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption("accept latency in each second", ("sans-serif", 15))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..seconds.len().max(1) as f64, 0f64..top * 1.1)
        .map_err(plot_error)?;
    chart.configure_mesh().x_desc("second the request was sent").y_desc("milliseconds").draw().map_err(plot_error)?;
    for (label, color) in [("p50", BLUE), ("p99", RED)] {
        let value = |(p50, p99): (f64, f64)| if label == "p50" { p50 } else { p99 };
        let points = seconds.iter().enumerate().filter_map(|(s, p)| p.map(|p| (s as f64 + 0.5, value(p))));
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)).point_size(2))
            .map_err(plot_error)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(plot_error)?;
    Ok(())
}

fn plot_error(err: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing the picture: {err}")
}
