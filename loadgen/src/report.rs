//! The result of a run: a summary table on stdout, JSON (`--json FILE`) and an SVG chart of the
//! latency distribution and the throughput over time (`--plot FILE.svg`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::procstat::Usage;
use crate::runner::Measured;
use crate::stats::Counts;

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// 99.99th percentile.
    pub p9999: u64,
    /// Largest.
    pub max: u64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            p9999: h.value_at_quantile(0.9999),
            max: h.max(),
        }
    }
}

/// Broker resource use over the measurement window.
#[derive(Debug, Clone, Serialize)]
pub struct BrokerUse {
    /// CPU seconds used.
    pub cpu_seconds: f64,
    /// CPU seconds per million delivered messages (or per million acked when nothing is
    /// delivered).
    pub cpu_seconds_per_million: f64,
    /// Memory at the start and end of the window.
    pub rss_start_bytes: u64,
    /// Memory at the end.
    pub rss_end_bytes: u64,
}

/// Everything a run reports.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Target name and address.
    pub target: String,
    /// Run parameters, as given.
    pub parameters: BTreeMap<String, String>,
    /// Seconds measured.
    pub seconds: f64,
    /// Counts within the window.
    pub counts: Counts,
    /// Sends per second.
    pub sent_per_sec: f64,
    /// Acks per second.
    pub acked_per_sec: f64,
    /// Deliveries per second.
    pub delivered_per_sec: f64,
    /// Send to ack.
    pub ack_latency_us: Percentiles,
    /// Send to delivery, at every recipient.
    pub delivery_latency_us: Percentiles,
    /// Scenario-specific latencies (e.g. `reconnect`: from starting a reconnect to being
    /// authenticated again).
    pub other_latency_us: BTreeMap<String, Percentiles>,
    /// Errors by code.
    pub errors: BTreeMap<String, u64>,
    /// Broker resource use, when measured.
    pub broker: Option<BrokerUse>,
    /// Scenario-specific figures.
    pub extra: BTreeMap<String, f64>,
    /// Per-second counts.
    pub timeline: Vec<(u64, Counts)>,
    #[serde(skip)]
    ack_hist: Option<Histogram<u64>>,
    #[serde(skip)]
    e2e_hist: Option<Histogram<u64>>,
}

impl Report {
    /// Builds a report from a measurement.
    #[must_use]
    pub fn new(
        scenario: &str,
        target: String,
        parameters: BTreeMap<String, String>,
        m: &Measured,
        errors: BTreeMap<String, u64>,
    ) -> Self {
        let secs = m.seconds.max(1e-9);
        let per_sec = |n: u64| n as f64 / secs;
        let broker = m.broker.map(|(a, b): (Usage, Usage)| {
            let cpu = b.cpu_seconds - a.cpu_seconds;
            let work = if m.window.delivered > 0 { m.window.delivered } else { m.window.acked };
            BrokerUse {
                cpu_seconds: cpu,
                cpu_seconds_per_million: if work > 0 { cpu * 1e6 / work as f64 } else { 0.0 },
                rss_start_bytes: a.rss_bytes,
                rss_end_bytes: b.rss_bytes,
            }
        });
        Self {
            scenario: scenario.to_owned(),
            target,
            parameters,
            seconds: m.seconds,
            counts: m.window,
            sent_per_sec: per_sec(m.window.sent),
            acked_per_sec: per_sec(m.window.acked),
            delivered_per_sec: per_sec(m.window.delivered),
            ack_latency_us: Percentiles::of(&m.latencies.ack),
            delivery_latency_us: Percentiles::of(&m.latencies.e2e),
            other_latency_us: m
                .latencies
                .other
                .iter()
                .map(|(k, h)| ((*k).to_owned(), Percentiles::of(h)))
                .collect(),
            errors,
            broker,
            extra: BTreeMap::new(),
            timeline: m.timeline.seconds.clone(),
            ack_hist: Some(m.latencies.ack.clone()),
            e2e_hist: Some(m.latencies.e2e.clone()),
        }
    }

    /// The human summary.
    #[must_use]
    pub fn table(&self) -> String {
        let mut s = String::new();
        let params: Vec<String> = self.parameters.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(
            s,
            "scenario {} against {} ({})",
            self.scenario,
            self.target,
            params.join(" ")
        );
        let _ = writeln!(s, "measured {:.1} s", self.seconds);
        let _ = writeln!(s, "{:<16}{:>14}{:>14}{:>14}", "", "sent", "acked", "delivered");
        let _ = writeln!(
            s,
            "{:<16}{:>14}{:>14}{:>14}",
            "total", self.counts.sent, self.counts.acked, self.counts.delivered
        );
        let _ = writeln!(
            s,
            "{:<16}{:>14.0}{:>14.0}{:>14.0}",
            "per second", self.sent_per_sec, self.acked_per_sec, self.delivered_per_sec
        );
        let _ = writeln!(
            s,
            "{:<16}{:>9}{:>9}{:>9}{:>9}{:>9}{:>9}  (µs)",
            "latency", "p50", "p90", "p99", "p99.9", "p99.99", "max"
        );
        let named =
            [("send→ack", &self.ack_latency_us), ("send→delivery", &self.delivery_latency_us)]
                .into_iter()
                .chain(self.other_latency_us.iter().map(|(k, p)| (k.as_str(), p)));
        for (name, p) in named {
            if p.count == 0 {
                continue;
            }
            let _ = writeln!(
                s,
                "{name:<16}{:>9}{:>9}{:>9}{:>9}{:>9}{:>9}",
                p.p50, p.p90, p.p99, p.p999, p.p9999, p.max
            );
        }
        if let Some(b) = &self.broker {
            let _ = writeln!(
                s,
                "broker: {:.2} CPU-s ({:.2} CPU-s per million), RSS {:.1} → {:.1} MiB",
                b.cpu_seconds,
                b.cpu_seconds_per_million,
                b.rss_start_bytes as f64 / 1048576.0,
                b.rss_end_bytes as f64 / 1048576.0
            );
        }
        for (k, v) in &self.extra {
            let _ = writeln!(s, "{k}: {v:.1}");
        }
        if self.errors.is_empty() {
            let _ = writeln!(s, "errors: none");
        } else {
            let errors: Vec<String> =
                self.errors.iter().map(|(k, v)| format!("{k} ×{v}")).collect();
            let _ = writeln!(s, "errors: {}", errors.join(", "));
        }
        s
    }

    /// Writes the JSON form and the chart where the options ask for them.
    ///
    /// # Errors
    /// When a file cannot be written.
    pub fn write_files(&self, common: &crate::cli::Common) -> anyhow::Result<()> {
        use anyhow::Context as _;
        if let Some(path) = &common.json {
            self.write_json(path).with_context(|| format!("writing {}", path.display()))?;
        }
        if let Some(path) = &common.plot {
            self.write_svg(path).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }

    /// Writes the JSON form.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, serde_json::to_vec_pretty(self)?)?;
        Ok(())
    }

    /// Writes an SVG with the latency distribution (percentile spectrum) and the throughput over
    /// time.
    ///
    /// # Errors
    /// When drawing or writing fails.
    pub fn write_svg(&self, path: &Path) -> anyhow::Result<()> {
        use plotters::prelude::*;
        let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        let (left, right) = root.split_horizontally(500);
        let spectrum = |h: &Option<Histogram<u64>>| -> Vec<(f64, f64)> {
            let Some(h) = h.as_ref().filter(|h| !h.is_empty()) else { return Vec::new() };
            [0.0_f64, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999, 0.99999]
                .iter()
                .map(|q| ((1.0 / (1.0 - q)).log10(), h.value_at_quantile(*q) as f64 / 1000.0))
                .collect()
        };
        let ack = spectrum(&self.ack_hist);
        let e2e = spectrum(&self.e2e_hist);
        let ymax = ack.iter().chain(&e2e).map(|p| p.1).fold(0.1, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(&left)
            .caption("Latency by percentile (ms)", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..5.0, 0.0..ymax)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .x_label_formatter(&|x: &f64| match x.round() as i64 {
                0 => "0%".into(),
                1 => "90%".into(),
                2 => "99%".into(),
                3 => "99.9%".into(),
                4 => "99.99%".into(),
                _ => "99.999%".into(),
            })
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        for (data, color, label) in [(&ack, &BLUE, "send→ack"), (&e2e, &RED, "send→delivery")] {
            if data.is_empty() {
                continue;
            }
            chart
                .draw_series(LineSeries::new(data.iter().copied(), color))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;

        let n = self.timeline.len().max(1) as f64;
        let peak = self
            .timeline
            .iter()
            .map(|(_, c)| c.sent.max(c.acked).max(c.delivered) as f64)
            .fold(1.0, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(&right)
            .caption("Throughput (messages/s)", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..n, 0.0..peak)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart.configure_mesh().x_desc("second").draw().map_err(|e| anyhow::anyhow!("{e}"))?;
        let series = |f: fn(&Counts) -> u64| -> Vec<(f64, f64)> {
            self.timeline.iter().map(|(s, c)| (*s as f64, f(c) as f64)).collect()
        };
        for (data, color, label) in [
            (series(|c| c.sent), &BLUE, "sent"),
            (series(|c| c.acked), &GREEN, "acked"),
            (series(|c| c.delivered), &RED, "delivered"),
        ] {
            chart
                .draw_series(LineSeries::new(data, color))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(())
    }
}
