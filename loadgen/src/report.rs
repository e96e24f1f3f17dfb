//! One run's figures (printed, and written as JSON), and the summary over many runs.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use chrono::{DateTime, Utc};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::Scenario;
use crate::cost::Cost;

#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    pub scenario: Scenario,
    /// How the api was configured, as the caller said (`--label`).
    #[serde(default)]
    pub label: String,
    pub started_at: DateTime<Utc>,
    pub events: u32,
    /// Tickets per event.
    pub capacity: u32,
    pub orders: u64,
    pub concurrency: usize,
    /// `rate`: the arrival rate asked for, per second.
    pub rate: Option<u32>,
    /// Answered 202 (baseline: sold).
    pub accepted: u64,
    /// Answered 409 `sold_out` at once (baseline: rejected).
    pub refused: u64,
    /// Anything else, or no answer.
    pub errors: u64,
    /// Requests answered per second while they were being sent.
    pub answered_per_sec: f64,
    /// Requests decided per second, from the first request to the last decision (a 409
    /// answer, or an accepted order reaching its first state after `QUEUED`).
    pub end_to_end_per_sec: f64,
    pub accept_ms: Option<Percentiles>,
    /// Open loop: how late the load generator started its requests, after they were due (a
    /// part of `accept_ms`, the load generator's own).
    #[serde(default)]
    pub started_late_ms: Option<Percentiles>,
    pub accept_to_final_ms: Option<Percentiles>,
    pub sold: i64,
    pub oversold: i64,
    /// Accepted orders still `QUEUED` when the run gave up waiting.
    pub lost: i64,
    pub api_peak_rss_mib: Option<f64>,
    pub worker_peak_rss_mib: Option<f64>,
    pub drain: Option<Drain>,
    /// `prequeue`: the draw at the opening, and the decisions after it.
    #[serde(default)]
    pub draw: Option<DrawRun>,
    /// What the run cost: CPU per process, statements, rows written and broker messages.
    #[serde(default)]
    pub cost: Option<Cost>,
    /// Orders answered and decided per second, and the accept-latency distribution.
    #[serde(default)]
    pub timeline: Option<Timeline>,
}

/// What the run's picture shows.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Timeline {
    /// Requests answered `202` in each second since the start.
    pub accepted_per_sec: Vec<u64>,
    /// Orders decided (a first status after `QUEUED`, or a `409` at once) in each second.
    pub decided_per_sec: Vec<u64>,
    /// `(percentile, milliseconds)` of the accept latency, 0 to 100.
    pub accept_latency_ms: Vec<(f64, f64)>,
    /// The accept latency's `(p50, p99)` in milliseconds of the requests sent (closed loop)
    /// or due (open loop) in each second since the start, so that a slow first second cannot
    /// hide in the run's percentiles; `None` for a second without an accepted request.
    #[serde(default)]
    pub accept_p50_p99_ms_per_sec: Vec<Option<(f64, f64)>>,
}

impl Timeline {
    /// Counts per whole second after `start`.
    pub fn per_second(start: DateTime<Utc>, times: impl IntoIterator<Item = DateTime<Utc>>) -> Vec<u64> {
        let mut counts: Vec<u64> = Vec::new();
        for at in times {
            let second = usize::try_from((at - start).num_milliseconds().max(0) / 1000).unwrap_or(0);
            if counts.len() <= second {
                counts.resize(second + 1, 0);
            }
            counts[second] += 1;
        }
        counts
    }

    /// `(p50, p99)` in milliseconds of latencies in microseconds, each given with when it
    /// ended, grouped by the whole second after `start` at which each began.
    pub fn latency_per_second(
        start: DateTime<Utc>,
        latencies: impl IntoIterator<Item = (DateTime<Utc>, u64)>,
    ) -> anyhow::Result<Vec<Option<(f64, f64)>>> {
        let mut seconds: Vec<Histogram<u64>> = Vec::new();
        for (ended, micros) in latencies {
            let began = ended - chrono::Duration::microseconds(i64::try_from(micros).unwrap_or(0));
            let second = usize::try_from((began - start).num_milliseconds().max(0) / 1000).unwrap_or(0);
            while seconds.len() <= second {
                seconds.push(Histogram::new(3)?);
            }
            seconds[second].record(micros)?;
        }
        Ok(seconds.iter().map(|h| Percentiles::of(h).map(|p| (p.p50, p.p99))).collect())
    }

    /// The latency at every percentile of a histogram of microseconds, in milliseconds.
    pub fn latency_curve(histogram: &Histogram<u64>) -> Vec<(f64, f64)> {
        if histogram.is_empty() {
            return Vec::new();
        }
        (0..100)
            .map(f64::from)
            .chain([99.5, 99.9, 100.0])
            .map(|p| (p, histogram.value_at_quantile(p / 100.0) as f64 / 1000.0))
            .collect()
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// Of a histogram of microseconds, in milliseconds.
    pub fn of(histogram: &Histogram<u64>) -> Option<Self> {
        let ms = |micros: u64| micros as f64 / 1000.0;
        (!histogram.is_empty()).then(|| Self {
            p50: ms(histogram.value_at_quantile(0.5)),
            p99: ms(histogram.value_at_quantile(0.99)),
            max: ms(histogram.max()),
        })
    }
}

/// `backlog`: how the queued orders drained once a worker ran.
#[derive(Debug, Serialize, Deserialize)]
pub struct Drain {
    pub orders: u64,
    pub seconds: f64,
    pub per_sec: f64,
    /// Resident memory, sampled every second during the drain.
    pub api_rss_mib: Vec<f64>,
    pub worker_rss_mib: Vec<f64>,
}

/// `prequeue`: the opening of a pre-sale.
#[derive(Debug, Serialize, Deserialize)]
pub struct DrawRun {
    /// Entries numbered by the draw.
    pub entries: u64,
    /// From the opening (`sales_start`) to the draw's end: the worker loop's wait (at most
    /// `EXPIRY_INTERVAL_MS`), the locks, and the numbering.
    pub draw_ms: f64,
    /// Entries decided per second, from the draw until all were seen decided (polled every
    /// 20 ms).
    pub decided_per_sec: f64,
}

fn range(samples: &[f64]) -> String {
    match (samples.first(), samples.last()) {
        (Some(first), Some(last)) => {
            let max = samples.iter().copied().fold(f64::MIN, f64::max);
            format!("first {first:.0} / max {max:.0} / last {last:.0} MiB")
        }
        _ => "-".to_owned(),
    }
}

impl Report {
    pub fn print(&self) {
        let pct = |p: &Option<Percentiles>| match p {
            Some(p) => format!("p50 {:.1} / p99 {:.1} / max {:.1} ms", p.p50, p.p99, p.max),
            None => "-".to_owned(),
        };
        let mib = |m: Option<f64>| m.map_or("-".to_owned(), |m| format!("{m:.0} MiB"));
        println!();
        println!("scenario            {:?} {}", self.scenario, self.label);
        println!("orders              {} over {} event(s) of {} tickets", self.orders, self.events, self.capacity);
        match self.rate {
            Some(rate) => println!("arrivals            {rate}/s (open loop)"),
            None => println!("in flight           {}", self.concurrency),
        }
        println!("accepted/refused    {} / {} ({} errors)", self.accepted, self.refused, self.errors);
        println!("answered/s          {:.0}", self.answered_per_sec);
        println!("end-to-end orders/s {:.0}", self.end_to_end_per_sec);
        println!("accept latency      {}", pct(&self.accept_ms));
        if self.started_late_ms.is_some() {
            println!("  of which sent late {}", pct(&self.started_late_ms));
        }
        println!("accept → final      {}", pct(&self.accept_to_final_ms));
        if let Some(seconds) = self.timeline.as_ref().map(|t| &t.accept_p50_p99_ms_per_sec).filter(|s| !s.is_empty()) {
            let p99 = |s: &Option<(f64, f64)>| s.map_or("-".to_owned(), |(_, p99)| format!("{p99:.1}"));
            let worst =
                seconds.iter().enumerate().filter_map(|(i, s)| s.map(|s| (i, s.1))).max_by(|a, b| a.1.total_cmp(&b.1));
            let worst = worst.map_or("-".to_owned(), |(i, ms)| format!("{ms:.1} ms in second {i}"));
            println!("accept p99 by second first {} ms, worst {worst}", p99(&seconds[0]));
        }
        println!("sold / capacity     {} / {}", self.sold, u64::from(self.events) * u64::from(self.capacity));
        println!("oversold            {}", self.oversold);
        println!("lost                {}", self.lost);
        println!("peak RSS api/worker {} / {}", mib(self.api_peak_rss_mib), mib(self.worker_peak_rss_mib));
        if let Some(drain) = &self.drain {
            println!("drain               {} orders in {:.1} s = {:.0}/s", drain.orders, drain.seconds, drain.per_sec);
            println!("  api RSS           {}", range(&drain.api_rss_mib));
            println!("  worker RSS        {}", range(&drain.worker_rss_mib));
        }
        if let Some(draw) = &self.draw {
            println!(
                "draw                {} entries drawn {:.0} ms after the opening; then {:.0} decided/s",
                draw.entries, draw.draw_ms, draw.decided_per_sec
            );
        }
        if let Some(cost) = &self.cost {
            let per_order = |seconds: f64| seconds * 1e6 / cost.decided_orders.max(1) as f64;
            let groups: Vec<String> =
                cost.cpu_seconds.groups().iter().map(|(name, s)| format!("{name} {:.0}", per_order(*s))).collect();
            let opt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
            println!("CPU µs/order        {} ({})", opt(cost.cpu_us_per_order), groups.join(", "));
            println!("statements/order    {}", opt(cost.statements_per_order));
            println!("rows written/order  {}", opt(cost.rows_written_per_order));
            println!("messages/order      {}", cost.messages_per_order.map_or("-".to_owned(), |m| format!("{m:.3}")));
            for statement in cost.top_statements.iter().take(6) {
                println!(
                    "  {:>9.1} ms {:>7} calls {:>7} rows  {:.110}",
                    statement.total_ms, statement.calls, statement.rows, statement.query
                );
            }
        }
    }
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 { values[mid] } else { (values[mid - 1] + values[mid]) / 2.0 })
}

/// The reports in `dir` (every `*.json`), by (events, scenario, label).
fn read_reports(dir: &Path) -> anyhow::Result<BTreeMap<(u32, Scenario, String), Vec<Report>>> {
    let mut groups: BTreeMap<(u32, Scenario, String), Vec<Report>> = BTreeMap::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            let report: Report = serde_json::from_slice(&std::fs::read(&path)?)
                .with_context(|| format!("reading {}", path.display()))?;
            groups.entry((report.events, report.scenario, report.label.clone())).or_default().push(report);
        }
    }
    Ok(groups)
}

/// One line of the cost table: medians of the runs' costs.
fn cost_row(name: &str, events: u32, runs: &[Report]) -> String {
    let fmt = |v: Option<f64>, digits: usize| v.map_or("-".to_owned(), |v| format!("{v:.digits$}"));
    let cost =
        |f: &dyn Fn(&Cost) -> Option<f64>| median(runs.iter().filter_map(|r| r.cost.as_ref().and_then(f)).collect());
    let per_order = |group: fn(&crate::cost::CpuSeconds) -> Option<f64>| {
        cost(&|c| group(&c.cpu_seconds).map(|s| s * 1e6 / c.decided_orders.max(1) as f64))
    };
    format!(
        "| {name} | {events} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
        fmt(cost(&|c| c.cpu_us_per_order), 0),
        fmt(per_order(|c| c.api), 0),
        fmt(per_order(|c| c.worker), 0),
        fmt(per_order(|c| c.postgres), 0),
        fmt(per_order(|c| c.rabbitmq), 0),
        fmt(per_order(|c| c.loadgen), 0),
        fmt(cost(&|c| c.statements_per_order), 2),
        fmt(cost(&|c| c.rows_written_per_order), 2),
        fmt(cost(&|c| c.messages_per_order), 3),
    )
}

/// The rows under a scenario's: each `backlog` run's drain, and `prequeue`'s draw.
fn extra_rows(table: &mut String, runs: &[Report]) {
    for drain in runs.iter().filter_map(|r| r.drain.as_ref()) {
        let _ = writeln!(
            table,
            "|   drain | | | {:.0} orders/s ({} orders in {:.0} s) | | | | | | api {}; worker {} | |",
            drain.per_sec,
            drain.orders,
            drain.seconds,
            range(&drain.api_rss_mib),
            range(&drain.worker_rss_mib)
        );
    }
    let draws: Vec<&DrawRun> = runs.iter().filter_map(|r| r.draw.as_ref()).collect();
    if !draws.is_empty() {
        let _ = writeln!(
            table,
            "|   draw | | | {:.0} entries decided/s after it | | | | | | drawn {:.0} ms after the opening ({:.0} entries) | |",
            median(draws.iter().map(|d| d.decided_per_sec).collect()).unwrap_or(0.0),
            median(draws.iter().map(|d| d.draw_ms).collect()).unwrap_or(0.0),
            median(draws.iter().map(|d| d.entries as f64).collect()).unwrap_or(0.0),
        );
    }
}

/// Medians per (scenario, events, label) over every `*.json` in `dir`, with the ratio of
/// each pipeline scenario to the baseline over the same number of events.
pub fn summary(dir: &Path, markdown: Option<&Path>) -> anyhow::Result<()> {
    let groups = read_reports(dir)?;
    // Baselines by number of events, and by durability: a run is compared with the baseline
    // measured on the same kind of PostgreSQL.
    let durable = |label: &str| label.contains("durable");
    let baseline: BTreeMap<(u32, bool), f64> = groups
        .iter()
        .filter(|((_, scenario, _), _)| *scenario == Scenario::Baseline)
        .filter_map(|((events, _, label), runs)| {
            Some(((*events, durable(label)), median(runs.iter().map(|r| r.end_to_end_per_sec).collect())?))
        })
        .collect();
    // The ceiling: what the api answers per second when a request does the purchase path's
    // fixed work (authentication, JSON in and out) and nothing else.
    let ceiling = median(
        groups
            .iter()
            .filter(|((_, scenario, _), _)| *scenario == Scenario::Ceiling)
            .flat_map(|(_, runs)| runs.iter().map(|r| r.answered_per_sec))
            .collect(),
    );

    let mut table = String::from(
        "| scenario | events | runs | end-to-end orders/s | × baseline | × ceiling | answered/s | accept p50 / p99 ms | accept→final p50 / p99 ms | peak RSS api / worker MiB | oversold / lost |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut costs = String::from(
        "| scenario | events | CPU µs per decided order | api | worker | PostgreSQL | RabbitMQ | loadgen | statements / order | rows written / order | messages / order |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for ((events, scenario, label), runs) in &groups {
        let med = |f: &dyn Fn(&Report) -> Option<f64>| median(runs.iter().filter_map(f).collect());
        let fmt = |v: Option<f64>, digits: usize| v.map_or("-".to_owned(), |v| format!("{v:.digits$}"));
        let end_to_end = med(&|r| Some(r.end_to_end_per_sec));
        let ratio = match (scenario, end_to_end, baseline.get(&(*events, durable(label)))) {
            (Scenario::Baseline | Scenario::Backlog | Scenario::Rate | Scenario::Prequeue | Scenario::Ceiling, ..) => {
                "-".to_owned()
            }
            (_, Some(e2e), Some(base)) => format!("{:.2}", e2e / base),
            _ => "-".to_owned(),
        };
        let of_ceiling = match (scenario, end_to_end, ceiling) {
            (Scenario::Ceiling, ..) => "1".to_owned(),
            (_, Some(e2e), Some(ceiling)) => format!("{:.2}", e2e / ceiling),
            _ => "-".to_owned(),
        };
        let name = if label.is_empty() { format!("{scenario:?}") } else { format!("{scenario:?} ({label})") };
        let worst = |f: &dyn Fn(&Report) -> i64| runs.iter().map(f).max().unwrap_or(0);
        let _ = writeln!(
            table,
            "| {name} | {events} | {} | {} | {ratio} | {of_ceiling} | {} | {} / {} | {} / {} | {} / {} | {} / {} |",
            runs.len(),
            fmt(end_to_end, 0),
            fmt(med(&|r| Some(r.answered_per_sec)), 0),
            fmt(med(&|r| r.accept_ms.as_ref().map(|p| p.p50)), 1),
            fmt(med(&|r| r.accept_ms.as_ref().map(|p| p.p99)), 1),
            fmt(med(&|r| r.accept_to_final_ms.as_ref().map(|p| p.p50)), 1),
            fmt(med(&|r| r.accept_to_final_ms.as_ref().map(|p| p.p99)), 1),
            fmt(med(&|r| r.api_peak_rss_mib), 0),
            fmt(med(&|r| r.worker_peak_rss_mib), 0),
            worst(&|r| r.oversold),
            worst(&|r| r.lost),
        );
        extra_rows(&mut table, runs);
        if runs.iter().any(|r| r.cost.is_some()) {
            costs.push_str(&cost_row(&name, *events, runs));
        }
    }
    table.push_str("\nCost, medians of the runs (CPU time per process sampled from /proc during the run):\n\n");
    table.push_str(&costs);
    println!("{table}");
    if let Some(path) = markdown {
        std::fs::write(path, &table)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }
}
