//! The benchmark proper: runs cycles with a number in flight, fills a driver with
//! volumes, times snapshots and measures I/O; `csi` plays Kubernetes, `stats`
//! turns latencies into percentiles.

pub mod csi;
pub mod floor;
pub mod io;
pub mod stats;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use csi::Session;
use stats::Timings;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("cannot connect to {endpoint}: {message}")]
    Connect { endpoint: String, message: String },
    #[error("{rpc} failed: {code:?}: {message}")]
    Rpc {
        rpc: &'static str,
        code: tonic::Code,
        message: String,
    },
    #[error("driver broke the CSI protocol: {0}")]
    Protocol(&'static str),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("worker task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("{0}")]
    Usage(String),
    #[error("interrupted by SIGINT or SIGTERM; the steps under way finished and what the run made is undone")]
    Interrupted,
}

impl BenchError {
    /// `first`'s error, unless it is only the interruption and undoing failed:
    /// then the failure, which says what was left behind.
    pub fn and_undo<T>(
        first: Result<T, BenchError>,
        undo: Result<(), BenchError>,
    ) -> Result<T, BenchError> {
        match (first, undo) {
            (Err(BenchError::Interrupted), Err(e)) => Err(e),
            (first, undo) => first.and_then(|v| undo.map(|()| v)),
        }
    }
}

/// Set by the first SIGINT (Ctrl-C) or SIGTERM: no new step starts, steps under
/// way finish, and what the run made is undone, as when a step fails. The bench's
/// volumes, mounts and loop devices are not the driver's to clean up after it. A
/// second signal exits at once, leaving whatever is still up.
#[derive(Clone, Default)]
pub struct Stop(Arc<AtomicBool>);

/// Keeps the signal handler's task until dropped.
pub struct Watch(tokio::task::JoinHandle<()>);

impl Drop for Watch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Stop {
    /// A flag the signals set; `what` says on stderr what happens next.
    pub fn on_signals(what: &'static str) -> Result<(Stop, Watch), BenchError> {
        use tokio::signal::unix::{signal, SignalKind};
        let err = |e| csi::io_err(std::path::Path::new("signal handler"), e);
        let mut int = signal(SignalKind::interrupt()).map_err(err)?;
        let mut term = signal(SignalKind::terminate()).map_err(err)?;
        let stop = Stop::default();
        let flag = stop.0.clone();
        let handle = tokio::spawn(async move {
            for second in [false, true] {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                if second {
                    eprintln!("localvol-bench: second signal: exiting now; volumes, mounts or devices may be left");
                    std::process::exit(130);
                }
                eprintln!("localvol-bench: {what} (a second signal exits at once)");
                flag.store(true, Ordering::Relaxed);
            }
        });
        Ok((stop, Watch(handle)))
    }

    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// `Interrupted` once set: called before each step that would make something.
    pub fn check(&self) -> Result<(), BenchError> {
        if self.is_set() {
            Err(BenchError::Interrupted)
        } else {
            Ok(())
        }
    }
}

/// What a run against a driver says when a signal stops it.
pub const UNDOING: &str =
    "interrupted: starting nothing new; undoing what the run made once the steps under way finish";

/// Prints `label: done/total (rate/s)` to stderr every second until dropped, so
/// short runs stay quiet and long ones show they are alive.
pub struct Progress {
    handle: tokio::task::JoinHandle<()>,
}

impl Progress {
    pub fn start(label: String, total: usize, done: Arc<AtomicUsize>) -> Progress {
        let handle = tokio::spawn(async move {
            let start = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let d = done.load(Ordering::Relaxed);
                let rate = d as f64 / start.elapsed().as_secs_f64();
                eprintln!("{label}: {d}/{total} ({rate:.1}/s)");
            }
        });
        Progress { handle }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// The outcome of `n` cycles with `c` in flight.
pub struct CycleRun {
    pub cycles: usize,
    pub concurrency: usize,
    pub seconds: f64,
    pub timings: Timings,
}

impl CycleRun {
    pub fn per_second(&self) -> f64 {
        self.cycles as f64 / self.seconds
    }

    pub fn to_json(&self) -> Value {
        json!({
            "cycles": self.cycles,
            "concurrency": self.concurrency,
            "seconds": self.seconds,
            "cycles_per_second": self.per_second(),
            "rpcs": rpcs_json(&self.timings),
        })
    }
}

pub fn rpcs_json(t: &Timings) -> Value {
    Value::Array(
        t.summaries()
            .into_iter()
            .map(|(name, s)| {
                let mut v = serde_json::to_value(s).expect("plain struct");
                v["rpc"] = json!(name);
                v
            })
            .collect(),
    )
}

pub fn rpcs_table(t: &Timings) -> String {
    let rows = t.summaries();
    let w = rows
        .iter()
        .map(|(name, _)| name.len())
        .max()
        .unwrap_or(0)
        .max(26);
    let mut out = format!(
        "  {:<w$} {:>7} {:>9} {:>9} {:>9}\n",
        "step", "count", "p50 ms", "p99 ms", "max ms"
    );
    for (name, s) in rows {
        out += &format!(
            "  {:<w$} {:>7} {:>9.3} {:>9.3} {:>9.3}\n",
            name, s.count, s.p50_ms, s.p99_ms, s.max_ms
        );
    }
    out
}

/// Runs `n` full cycles, `c` at a time; stops at the first failure or at a signal
/// (after the cycles under way have undone their own steps) and returns it.
pub async fn run_cycles(
    s: &Session,
    n: usize,
    c: usize,
    prefix: &str,
    label: &str,
) -> Result<CycleRun, BenchError> {
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let _progress = Progress::start(label.to_string(), n, done.clone());
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..c.max(1) {
        let (mut s, next, done, failed) = (s.clone(), next.clone(), done.clone(), failed.clone());
        let prefix = prefix.to_string();
        workers.push(tokio::spawn(async move {
            let mut t = Timings::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n || failed.load(Ordering::Relaxed) {
                    return (t, Ok(()));
                }
                let r = match s.stop.check() {
                    Ok(()) => csi::cycle(&mut s, &mut t, &format!("{prefix}-{i}")).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = r {
                    failed.store(true, Ordering::Relaxed);
                    return (t, Err(e));
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let mut timings = Timings::default();
    let mut first_err = None;
    for w in workers {
        let (t, r) = w.await?;
        timings.merge(t);
        match r {
            // A failure says more than the interruption other workers stopped at.
            Err(e) if matches!(first_err, None | Some(BenchError::Interrupted)) => {
                first_err = Some(e)
            }
            _ => {}
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    match first_err {
        Some(e) => Err(e),
        None => Ok(CycleRun {
            cycles: n,
            concurrency: c.max(1),
            seconds,
            timings,
        }),
    }
}

/// `n` rounds of [`Session::idle_calls`], one call at a time, after `warmup`
/// rounds left out of the figures: the part of every RPC that is not the
/// driver's work, beside which `cycle`'s per-call figures can be read.
pub async fn round_trips(s: &Session, n: usize, warmup: usize) -> Result<Value, BenchError> {
    let mut s = s.clone();
    for _ in 0..warmup {
        s.stop.check()?;
        s.idle_calls(&mut Timings::default()).await?;
    }
    let done = Arc::new(AtomicUsize::new(0));
    let _progress = Progress::start("rounds".to_string(), n, done.clone());
    let mut t = Timings::default();
    let start = Instant::now();
    for _ in 0..n {
        s.stop.check()?;
        s.idle_calls(&mut t).await?;
        done.fetch_add(1, Ordering::Relaxed);
    }
    Ok(json!({
        "rounds": n,
        "seconds": start.elapsed().as_secs_f64(),
        "rpcs": rpcs_json(&t),
    }))
}

/// `n` cycles before a measurement, with its concurrency, whose figures are
/// dropped: what a first cycle pays alone (connections, caches, a pool's threads)
/// is not the driver's steady pace.
pub async fn warm_up(s: &Session, n: usize, c: usize, prefix: &str) -> Result<(), BenchError> {
    if n > 0 {
        run_cycles(s, n, c, &format!("{prefix}-warmup"), "warmup cycles").await?;
    }
    Ok(())
}

/// Applies `op` to every item, `c` at a time, with progress; returns the
/// successes, timings and the first error (the rest still run, so a fill that
/// fails part way can still be deleted). With `stop`, a signal ends it before the
/// next item (an undo is run without, to its end).
pub async fn for_each<T, R, F, Fut>(
    s: &Session,
    items: Vec<T>,
    c: usize,
    label: &str,
    stop: Option<Stop>,
    op: F,
) -> (Vec<R>, Timings, Option<BenchError>)
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(Session, Timings, T) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = (Session, Timings, Result<R, BenchError>)> + Send,
{
    let total = items.len();
    let queue = Arc::new(std::sync::Mutex::new(items.into_iter()));
    let done = Arc::new(AtomicUsize::new(0));
    let _progress = Progress::start(label.to_string(), total, done.clone());
    let op = Arc::new(op);
    let mut workers = Vec::new();
    for _ in 0..c.max(1) {
        let (mut s, queue, done, op) = (s.clone(), queue.clone(), done.clone(), op.clone());
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let mut t = Timings::default();
            let mut ok = Vec::new();
            let mut err = None;
            loop {
                let item = queue.lock().expect("queue lock").next();
                let Some(item) = item else { break };
                if let Some(Err(e)) = stop.as_ref().map(Stop::check) {
                    err.get_or_insert(e);
                    break;
                }
                let (s2, t2, r) = op(s, t, item).await;
                (s, t) = (s2, t2);
                match r {
                    Ok(v) => ok.push(v),
                    Err(e) => {
                        err.get_or_insert(e);
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            (ok, t, err)
        }));
    }
    let (mut all, mut timings, mut first) = (Vec::new(), Timings::default(), None);
    for w in workers {
        match w.await {
            Ok((ok, t, err)) => {
                all.extend(ok);
                timings.merge(t);
                if let Some(e) = err {
                    first.get_or_insert(e);
                }
            }
            Err(e) => {
                first.get_or_insert(e.into());
            }
        }
    }
    (all, timings, first)
}

/// Creates `m` idle volumes (staged and published too if `published`, as pods
/// of other workloads would hold them), measures, and takes them down again;
/// the ratio is throughput with them over throughput without (1.0 = no slowdown).
pub async fn scale(
    s: &Session,
    m: usize,
    n: usize,
    c: usize,
    fill_c: usize,
    published: bool,
    prefix: &str,
) -> Result<Value, BenchError> {
    let settle_empty = settle().await;
    let empty = run_cycles(s, n, c, &format!("{prefix}-empty"), "cycles").await?;
    let names: Vec<String> = (0..m).map(|i| format!("{prefix}-idle-{i}")).collect();
    let start = Instant::now();
    let (volumes, fill_t, mut first_err) = for_each(
        s,
        names,
        fill_c,
        "creating idle volumes",
        Some(s.stop.clone()),
        |mut s, mut t, name| async move {
            let r = s.create(&mut t, &name, None).await.map(|v| (name, v));
            (s, t, r)
        },
    )
    .await;
    let fill_secs = start.elapsed().as_secs_f64();
    let created = volumes.len();
    let ids: Vec<String> = volumes.iter().map(|(_, v)| v.volume_id.clone()).collect();

    let mut publish = None;
    let mut pods = Vec::new();
    if published && first_err.is_none() {
        let start = Instant::now();
        let (up, t, err) = for_each(
            s,
            volumes,
            fill_c,
            "publishing idle volumes",
            Some(s.stop.clone()),
            |mut s, mut t, (name, volume)| async move {
                let mut pod = csi::Pod::new(&s, volume, &name);
                let r = match pod.up(&mut s, &mut t).await {
                    Ok(()) => Ok(pod),
                    // Undo the part that was done; the volume itself is deleted below.
                    Err(e) => Err(match pod.down(&mut s, &mut t).await {
                        Ok(()) => e,
                        Err(down) => {
                            eprintln!(
                                "localvol-bench: undoing a failed publish of {} failed too: {down}",
                                pod.volume.volume_id
                            );
                            e
                        }
                    }),
                };
                (s, t, r)
            },
        )
        .await;
        let secs = start.elapsed().as_secs_f64();
        publish = Some(json!({
            "volumes": up.len(),
            "seconds": secs,
            "per_second": up.len() as f64 / secs,
            "rpcs": rpcs_json(&t),
        }));
        pods = up;
        first_err = err;
    }

    let mut settle_full = 0.0;
    let full = match first_err {
        Some(e) => Err(e),
        None => {
            settle_full = settle().await;
            run_cycles(s, n, c, &format!("{prefix}-full"), "cycles").await
        }
    };

    // Volumes whose unpublish failed stay (deleting them would fail anyway), and
    // so do their mounts, for the user to inspect.
    let mut stuck: std::collections::HashSet<String> =
        pods.iter().map(|p| p.volume.volume_id.clone()).collect();
    let mut unpublish = None;
    let mut unpublish_err = None;
    if !pods.is_empty() {
        let count = pods.len();
        let start = Instant::now();
        let (down, t, err) = for_each(
            s,
            pods,
            fill_c,
            "unpublishing idle volumes",
            None,
            |mut s, mut t, mut pod| async move {
                let r = pod
                    .down(&mut s, &mut t)
                    .await
                    .map(|()| pod.volume.volume_id);
                (s, t, r)
            },
        )
        .await;
        let secs = start.elapsed().as_secs_f64();
        for id in &down {
            stuck.remove(id);
        }
        unpublish = Some(json!({
            "volumes": count,
            "seconds": secs,
            "per_second": count as f64 / secs,
            "rpcs": rpcs_json(&t),
        }));
        unpublish_err = err;
    }
    let to_delete: Vec<String> = ids.into_iter().filter(|id| !stuck.contains(id)).collect();
    let deleted = to_delete.len();
    let start = Instant::now();
    let (_, del_t, del_err) = for_each(
        s,
        to_delete,
        fill_c,
        "deleting idle volumes",
        None,
        |mut s, mut t, id| async move {
            let r = s.delete(&mut t, &id).await;
            (s, t, r)
        },
    )
    .await;
    let del_secs = start.elapsed().as_secs_f64();
    if !stuck.is_empty() {
        eprintln!(
            "localvol-bench: {} idle volumes left published (unpublish failed)",
            stuck.len()
        );
    }
    let undone = match unpublish_err.or(del_err) {
        Some(e) => Err(e),
        None => Ok(()),
    };
    let full = BenchError::and_undo(full, undone)?;
    Ok(json!({
        "existing": m,
        "published": published,
        "without": empty.to_json(),
        "with": full.to_json(),
        "ratio": full.per_second() / empty.per_second(),
        "settle_seconds": [settle_empty, settle_full],
        "fill": {
            "volumes": created,
            "concurrency": fill_c,
            "seconds": fill_secs,
            "per_second": created as f64 / fill_secs,
            "rpcs": rpcs_json(&fill_t),
        },
        "publish": publish,
        "unpublish": unpublish,
        "delete": {
            "seconds": del_secs,
            "per_second": deleted as f64 / del_secs,
            "rpcs": rpcs_json(&del_t),
        },
    }))
}

/// Writes back every dirty page on the machine (sync(2)) and says how long it
/// took. Run before each measured phase of `scale`: otherwise the writeback of
/// the thousands of volumes just made lands on the cycles measured with them, a
/// cost of having just made them, not of their number.
async fn settle() -> f64 {
    let start = Instant::now();
    let _ = tokio::task::spawn_blocking(|| unsafe { libc::sync() }).await;
    start.elapsed().as_secs_f64()
}

/// Times CreateSnapshot of a volume holding `mib` MiB and a restore from it.
pub async fn snapshot(s: &Session, mib: usize, prefix: &str) -> Result<Value, BenchError> {
    use localvol::proto::*;
    let mut s = s.clone();
    // Room for the data and a filesystem's own, whatever --size says: a driver that
    // enforces sizes would refuse the write otherwise.
    s.size = s.size.max(((mib as i64) << 20) * 5 / 4 + (16 << 20));
    let mut t = Timings::default();
    let name = format!("{prefix}-snapsrc");
    s.stop.check()?;
    let vol = s.create(&mut t, &name, None).await?;
    let mut pod = csi::Pod::new(&s, vol, &name);
    let mut restored = None;
    let mut snap_id = None;
    let mut figures = json!({});
    let result: Result<(), BenchError> = async {
        pod.up(&mut s, &mut t).await?;
        let data = if s.block {
            pod.target.clone()
        } else {
            pod.target.join("localvol-bench-snapshot.dat")
        };
        s.stop.check()?;
        let write_start = Instant::now();
        let d = data.clone();
        tokio::task::spawn_blocking(move || io::fill(&d, mib)).await??;
        figures["write_seconds"] = json!(write_start.elapsed().as_secs_f64());

        // Asked again until ready, as csi-snapshotter does (CreateSnapshot is
        // idempotent; ListSnapshots is optional), for at most ten minutes.
        let request = CreateSnapshotRequest {
            source_volume_id: pod.volume.volume_id.clone(),
            name: format!("{prefix}-snap"),
            ..Default::default()
        };
        let start = Instant::now();
        let mut first = true;
        let snap = loop {
            s.stop.check()?;
            let asked = Instant::now();
            let r = s
                .controller
                .create_snapshot(request.clone())
                .await
                .map_err(|st| BenchError::Rpc {
                    rpc: "CreateSnapshot",
                    code: st.code(),
                    message: st.message().to_string(),
                })?
                .into_inner();
            let snap = r
                .snapshot
                .ok_or(BenchError::Protocol("CreateSnapshot without a snapshot"))?;
            if first {
                t.record("CreateSnapshot", asked.elapsed());
                snap_id = Some(snap.snapshot_id.clone());
                figures["create_snapshot_seconds"] = json!(start.elapsed().as_secs_f64());
                first = false;
            } else if Some(&snap.snapshot_id) != snap_id.as_ref() {
                return Err(BenchError::Protocol(
                    "CreateSnapshot asked again answered another snapshot",
                ));
            }
            if snap.ready_to_use {
                break snap;
            }
            if start.elapsed() > Duration::from_secs(600) {
                return Err(BenchError::Protocol(
                    "the snapshot was not ready to use after ten minutes",
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        figures["snapshot_ready_seconds"] = json!(start.elapsed().as_secs_f64());

        s.stop.check()?;
        let start = Instant::now();
        let source = VolumeContentSource {
            r#type: Some(volume_content_source::Type::Snapshot(
                volume_content_source::SnapshotSource {
                    snapshot_id: snap.snapshot_id.clone(),
                },
            )),
        };
        let v = s
            .create(&mut t, &format!("{prefix}-restored"), Some(source))
            .await?;
        restored = Some(v.volume_id);
        figures["restore_seconds"] = json!(start.elapsed().as_secs_f64());
        Ok(())
    }
    .await;
    // Clean up in reverse, whatever happened above.
    let mut cleanup = pod.down(&mut s, &mut t).await;
    if let Some(id) = restored {
        cleanup = cleanup.and(s.delete(&mut t, &id).await);
    }
    if let Some(id) = snap_id {
        let start = Instant::now();
        let r = s
            .controller
            .delete_snapshot(DeleteSnapshotRequest {
                snapshot_id: id,
                secrets: Default::default(),
            })
            .await;
        figures["delete_snapshot_seconds"] = json!(start.elapsed().as_secs_f64());
        cleanup = cleanup.and(r.map(|_| ()).map_err(|st| BenchError::Rpc {
            rpc: "DeleteSnapshot",
            code: st.code(),
            message: st.message().to_string(),
        }));
    }
    // The source volume holds the S MiB: how long deleting that much data takes.
    let id = pod.volume.volume_id.clone();
    let start = Instant::now();
    cleanup = cleanup.and(s.delete(&mut t, &id).await);
    figures["delete_volume_seconds"] = json!(start.elapsed().as_secs_f64());
    BenchError::and_undo(result, cleanup)?;
    figures["mib"] = json!(mib);
    figures["rpcs"] = rpcs_json(&t);
    Ok(figures)
}

/// I/O inside a published volume against a plain file in `compare_dir`.
pub async fn io(
    s: &Session,
    opts: io::IoOptions,
    compare_dir: PathBuf,
    prefix: &str,
) -> Result<Value, BenchError> {
    let mut s = s.clone();
    let mut t = Timings::default();
    let name = format!("{prefix}-io");
    s.stop.check()?;
    let vol = s.create(&mut t, &name, None).await?;
    let mut pod = csi::Pod::new(&s, vol, &name);
    let result: Result<(Vec<io::IoFigures>, Vec<io::IoFigures>), BenchError> = async {
        pod.up(&mut s, &mut t).await?;
        let (in_volume, is_device) = if s.block {
            (pod.target.clone(), true)
        } else {
            (pod.target.join("localvol-bench-io.dat"), false)
        };
        let plain = compare_dir.join(format!("{prefix}-io.dat"));
        let o = opts.clone();
        let stop = s.stop.clone();
        let (vol, plain) = tokio::task::spawn_blocking(move || {
            let (mut v, mut p) = (vec![], vec![]);
            let measured = (|| {
                for round in 0..o.rounds.max(1) {
                    // Alternate who goes first, so a drift of the disk evens out.
                    for volume_turn in [round % 2 == 0, round % 2 == 1] {
                        stop.check()?;
                        if volume_turn {
                            eprintln!(
                                "io round {}: inside the volume ({})",
                                round + 1,
                                in_volume.display()
                            );
                            v.push(io::measure(&in_volume, is_device, &o)?);
                        } else {
                            eprintln!("io round {}: plain file ({})", round + 1, plain.display());
                            p.push(io::measure(&plain, false, &o)?);
                        }
                    }
                }
                Ok::<_, BenchError>(())
            })();
            let _ = std::fs::remove_file(&plain);
            measured?;
            Ok::<_, BenchError>((v, p))
        })
        .await??;
        Ok((vol, plain))
    }
    .await;
    let mut cleanup = pod.down(&mut s, &mut t).await;
    let id = pod.volume.volume_id.clone();
    cleanup = cleanup.and(s.delete(&mut t, &id).await);
    let (vols, plains) = BenchError::and_undo(result, cleanup)?;
    let (vol, plain) = (io::IoFigures::median(&vols), io::IoFigures::median(&plains));
    let per_round: Vec<Value> = vols.iter().zip(&plains).map(|(v, p)| v.ratio(p)).collect();
    Ok(json!({
        "file_mib": opts.file_mib,
        "rounds": vols.len(),
        "volume": vol,
        "plain": plain,
        "ratio": vol.ratio(&plain),
        "ratio_per_round": per_round,
        "rpcs": rpcs_json(&t),
    }))
}
