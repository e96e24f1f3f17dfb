//! A Prometheus exposition, scraped and checked.

use std::process::{Command, Stdio};

/// A Prometheus text exposition, as scraped from a `/metrics` endpoint.
pub struct Exposition {
    pub text: String,
}

impl Exposition {
    /// `GET {base}/metrics`, which must answer 200 in the text format.
    pub async fn scrape(base: &str) -> Self {
        let response = reqwest::get(format!("{base}/metrics")).await.expect("metrics endpoint reachable");
        assert_eq!(response.status(), 200, "GET {base}/metrics");
        let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
        assert!(content_type.starts_with("text/plain"), "content type {content_type}");
        Exposition { text: response.text().await.expect("metrics body") }
    }

    /// Scrapes `base` until `done` holds (counters recorded after a commit may trail it), for
    /// up to 15 s.
    pub async fn scrape_until(base: &str, what: &str, done: impl Fn(&Exposition) -> bool) -> Exposition {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            let exposition = Exposition::scrape(base).await;
            if done(&exposition) {
                return exposition;
            }
            assert!(tokio::time::Instant::now() < deadline, "{what}: not reached; last scrape:\n{}", exposition.text);
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// The sum of the samples named `name` whose labels include every `(label, value)` of
    /// `labels`; 0 when there is none.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples(name)
            .filter(|(sample_labels, _)| {
                labels.iter().all(|(k, v)| sample_labels.iter().any(|(sk, sv)| sk == k && sv == v))
            })
            .map(|(_, value)| value)
            .sum()
    }

    /// Whether any sample is named `name`.
    pub fn has(&self, name: &str) -> bool {
        self.samples(name).next().is_some()
    }

    fn samples<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (Vec<(String, String)>, f64)> + 'a {
        self.text.lines().filter(|line| !line.starts_with('#')).filter_map(move |line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, labels) = match series.split_once('{') {
                Some((series_name, labels)) => (series_name, labels.strip_suffix('}')?),
                None => (series, ""),
            };
            if series_name != name {
                return None;
            }
            // Label values here never hold `,` or `"` (routes, statuses, outcomes).
            let labels = labels
                .split(',')
                .filter(|pair| !pair.is_empty())
                .filter_map(|pair| {
                    let (key, value) = pair.split_once('=')?;
                    Some((key.to_owned(), value.trim_matches('"').to_owned()))
                })
                .collect();
            Some((labels, value.parse().ok()?))
        })
    }

    /// `promtool check metrics` (Prometheus's own linter, from the distribution's
    /// `prometheus` package, which `scripts/services.sh start` installs) on this exposition.
    pub fn check_with_promtool(&self) {
        use std::io::Write;
        let promtool = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".to_owned());
        let mut child = Command::new(&promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("running {promtool} (install the `prometheus` package, or run `make test`): {e}")
            });
        child.stdin.take().expect("stdin").write_all(self.text.as_bytes()).expect("exposition written to promtool");
        let out = child.wait_with_output().expect("promtool finished");
        assert!(
            out.status.success(),
            "promtool check metrics failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
