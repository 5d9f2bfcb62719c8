//! Reading values out of a parsed `/metrics` scrape.

use anyhow::Result;
use prometheus_parse::{Sample, Scrape, Value};

/// The one sample of `metric` whose labels include `labels`; the error lists
/// every sample of `metric` when none or several match.
pub fn sample<'a>(scrape: &'a Scrape, metric: &str, labels: &[(&str, &str)]) -> Result<&'a Sample> {
    let hits: Vec<&Sample> = scrape.samples.iter().filter(|s| matches(s, metric, labels)).collect();
    if let [one] = hits.as_slice() {
        Ok(one)
    } else {
        let all: Vec<String> = scrape
            .samples
            .iter()
            .filter(|s| s.metric == metric)
            .map(|s| format!("{:?} {:?}", s.labels, s.value))
            .collect();
        anyhow::bail!("{} samples of {metric} match {labels:?}; all of them: {all:#?}", hits.len())
    }
}

/// The value of the one sample of `metric` whose labels include `labels`.
pub fn value(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Result<f64> {
    Ok(number(&sample(scrape, metric, labels)?.value))
}

/// The sum over every sample of `metric` whose labels include `labels`: 0
/// when there is none (a counter not yet incremented has no series).
pub fn total(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    scrape.samples.iter().filter(|s| matches(s, metric, labels)).map(|s| number(&s.value)).sum()
}

/// A counter's, gauge's or untyped sample's value; NaN for histograms and
/// summaries, so a comparison with it fails.
pub fn number(v: &Value) -> f64 {
    match v {
        Value::Counter(x) | Value::Gauge(x) | Value::Untyped(x) => *x,
        Value::Histogram(_) | Value::Summary(_) => f64::NAN,
    }
}

fn matches(s: &Sample, metric: &str, labels: &[(&str, &str)]) -> bool {
    s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
}
