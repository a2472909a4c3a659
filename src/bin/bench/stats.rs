//! Latency summaries: kept as a pure function so the percentile rule is tested
//! apart from any driver.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

/// Percentiles of one RPC's latencies, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

/// Nearest-rank percentile of sorted samples: the smallest sample such that at
/// least `p` percent of samples are at or below it (no interpolation, so every
/// reported figure is a latency that really happened).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    assert!(!sorted.is_empty(), "percentile of no samples");
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Summarizes samples in any order; `None` when there are none.
pub fn summarize(samples: &[Duration]) -> Option<Summary> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let total: Duration = sorted.iter().sum();
    Some(Summary {
        count: sorted.len(),
        p50_ms: ms(percentile(&sorted, 50.0)),
        p99_ms: ms(percentile(&sorted, 99.0)),
        max_ms: ms(*sorted.last().unwrap()),
        mean_ms: ms(total) / sorted.len() as f64,
    })
}

/// Durations per step name, in the order steps were first seen, so reports list
/// RPCs in cycle order.
#[derive(Debug, Default, Clone)]
pub struct Timings {
    order: Vec<&'static str>,
    samples: BTreeMap<&'static str, Vec<Duration>>,
}

impl Timings {
    pub fn record(&mut self, step: &'static str, d: Duration) {
        if !self.samples.contains_key(step) {
            self.order.push(step);
        }
        self.samples.entry(step).or_default().push(d);
    }

    pub fn merge(&mut self, other: Timings) {
        let mut other = other;
        for step in other.order {
            let v = other.samples.remove(step).unwrap_or_default();
            if !self.samples.contains_key(step) {
                self.order.push(step);
            }
            self.samples.entry(step).or_default().extend(v);
        }
    }

    /// The median of one step, in milliseconds; None if it never ran.
    pub fn p50_ms(&self, step: &str) -> Option<f64> {
        summarize(self.samples.get(step)?).map(|s| s.p50_ms)
    }

    /// One summary per step, in first-seen order.
    pub fn summaries(&self) -> Vec<(&'static str, Summary)> {
        self.order
            .iter()
            .filter_map(|s| summarize(&self.samples[s]).map(|sum| (*s, sum)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|m| Duration::from_millis(*m)).collect()
    }

    #[test]
    fn nearest_rank_on_a_hundred_samples() {
        let s: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&s, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&s, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&s, 100.0), Duration::from_millis(100));
        assert_eq!(percentile(&s, 0.0), Duration::from_millis(1));
    }

    #[test]
    fn one_sample_is_every_percentile() {
        let sum = summarize(&ms(&[7])).unwrap();
        assert_eq!(sum.count, 1);
        assert_eq!(
            (sum.p50_ms, sum.p99_ms, sum.max_ms, sum.mean_ms),
            (7.0, 7.0, 7.0, 7.0)
        );
    }

    #[test]
    fn unsorted_input_and_small_counts() {
        // 4 samples: p50 is the 2nd smallest, p99 the largest.
        let sum = summarize(&ms(&[40, 10, 30, 20])).unwrap();
        assert_eq!(sum.p50_ms, 20.0);
        assert_eq!(sum.p99_ms, 40.0);
        assert_eq!(sum.max_ms, 40.0);
        assert_eq!(sum.mean_ms, 25.0);
    }

    #[test]
    fn empty_has_no_summary() {
        assert!(summarize(&[]).is_none());
    }

    #[test]
    fn timings_keep_first_seen_order_across_merges() {
        let mut a = Timings::default();
        a.record("CreateVolume", Duration::from_millis(1));
        a.record("DeleteVolume", Duration::from_millis(2));
        let mut b = Timings::default();
        b.record("NodeStageVolume", Duration::from_millis(3));
        b.record("CreateVolume", Duration::from_millis(5));
        a.merge(b);
        let names: Vec<_> = a.summaries().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["CreateVolume", "DeleteVolume", "NodeStageVolume"]);
        assert_eq!(a.summaries()[0].1.count, 2);
    }
}
