//! `localvol-bench`: measures what Kubernetes feels from a CSI driver — any
//! driver on a unix socket, so peers can be compared on the same machine.

#[path = "bench/mod.rs"]
mod bench;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::{json, Value};

use bench::csi::Session;
use bench::BenchError;

#[derive(Parser)]
#[command(
    name = "localvol-bench",
    version,
    about = "Benchmark a CSI driver over its unix socket the way Kubernetes uses it"
)]
struct Cli {
    /// The driver's CSI socket.
    #[arg(long, global = true, default_value = "unix:///run/localvol/csi.sock")]
    endpoint: String,
    /// A StorageClass parameter (repeatable), e.g. type=loop; handled as
    /// external-provisioner does: csi.storage.k8s.io/fstype becomes the mount
    /// capability's fs_type, no csi.storage.k8s.io/ key reaches CreateVolume.
    #[arg(long = "param", global = true, value_parser = parse_kv)]
    params: Vec<(String, String)>,
    /// The mount capability's fs_type (default: none, the driver's choice); for
    /// `floor --loop`, the filesystem made (default ext4).
    #[arg(long, global = true)]
    fs_type: Option<String>,
    /// Add to each CreateVolume the PVC and PV names, as external-provisioner
    /// does with --extra-create-metadata (deploy/ runs it so).
    #[arg(long, global = true)]
    extra_create_metadata: bool,
    /// Cycles run before measuring, in no figure: a first cycle's costs
    /// (connections, caches, the driver's threads) are not its pace.
    #[arg(long, global = true, default_value_t = 0)]
    warmup: usize,
    /// Volume size in bytes.
    #[arg(long, global = true, default_value_t = 64 << 20)]
    size: i64,
    /// Use block volumes instead of mounted filesystems.
    #[arg(long, global = true)]
    block: bool,
    /// Where staging and target paths are made; default: a temporary directory
    /// created and removed by the run.
    #[arg(long, global = true)]
    work_dir: Option<PathBuf>,
    /// The driver's process id, to report its peak resident memory (VmHWM).
    #[arg(long, global = true)]
    driver_pid: Option<u32>,
    /// Skip ControllerPublish/ControllerUnpublish even when the driver advertises
    /// PUBLISH_UNPUBLISH_VOLUME, as Kubernetes does when the CSIDriver object says
    /// `attachRequired: false` (how deploy/ installs localvol).
    #[arg(long, global = true)]
    no_controller_publish: bool,
    /// Make the node calls as the kubelet does: each on a connection of its own,
    /// dialled for it and closed after, with the NodeGetCapabilities calls the
    /// kubelet makes around them (two before staging, two before publishing, one
    /// before unstaging). Without it, node calls share the sidecars' one
    /// connection and no capabilities are asked during cycles.
    #[arg(long, global = true)]
    kubelet_dials: bool,
    /// One JSON object on stdout instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Full pod cycles: create, (controller publish), (stage), publish, write,
    /// and back down to delete.
    Cycle {
        /// Number of cycles.
        #[arg(short = 'n', default_value_t = 100)]
        n: usize,
        /// Cycles in flight.
        #[arg(short = 'c', default_value_t = 1)]
        c: usize,
    },
    /// Cycle throughput with no other volumes and with M idle ones.
    Scale {
        /// Idle volumes present during the second measurement.
        #[arg(long)]
        existing: usize,
        #[arg(short = 'n', default_value_t = 100)]
        n: usize,
        #[arg(short = 'c', default_value_t = 1)]
        c: usize,
        /// Creates and deletes of idle volumes in flight.
        #[arg(long, default_value_t = 8)]
        fill_concurrency: usize,
        /// Also stage and publish the idle volumes before the second measurement
        /// (2 mounts each for a directory volume), to show whether node RPCs slow
        /// down with the number of mounts on the node.
        #[arg(long)]
        published: bool,
    },
    /// CreateSnapshot of a volume holding S MiB, and a restore from it.
    Snapshot {
        #[arg(long, default_value_t = 512)]
        mib: usize,
    },
    /// Direct I/O in a published volume against a plain file.
    Io {
        /// Where the plain file goes; default: the work dir.
        #[arg(long)]
        compare_dir: Option<PathBuf>,
        /// Size of the test file in MiB (must fit in --size).
        #[arg(long, default_value_t = 32)]
        file_mib: usize,
        /// Seconds for each random 4 KiB pattern.
        #[arg(long, default_value_t = 3.0)]
        random_seconds: f64,
        /// Turns of volume and plain file; the medians are reported.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Round trips of calls that do no work (NodeGetCapabilities,
    /// ControllerGetCapabilities, Probe), one at a time: what every RPC of a cycle
    /// pays before the driver does anything. --warmup counts rounds here.
    Rtt {
        /// Rounds of the three calls.
        #[arg(short = 'n', default_value_t = 2000)]
        n: usize,
    },
    /// No driver: times the kernel and disk steps a pod cycle cannot skip (durable
    /// create and record, mounts, the pod's fsync, unmounts, record removal) in
    /// --work-dir, which should be on the driver root's filesystem. Their sum is
    /// the fastest cycle this filesystem allows.
    Floor {
        #[arg(short = 'n', default_value_t = 1000)]
        n: usize,
        /// Loop volumes of --size bytes (with --fs-type, default ext4): attach,
        /// probe, mkfs and mount instead of a bind mount.
        #[arg(long = "loop")]
        loop_volumes: bool,
    },
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not key=value")),
    }
}

/// Peak resident memory in KiB from /proc/PID/status.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// A temporary work dir that is removed only if empty, so a mount left behind
/// by a failing driver never has its contents deleted.
struct WorkDir {
    path: PathBuf,
    owned: bool,
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.owned {
            for sub in ["staging", "pods", ""] {
                let _ = std::fs::remove_dir(self.path.join(sub));
            }
            if self.path.exists() {
                eprintln!(
                    "localvol-bench: left {} in place (not empty)",
                    self.path.display()
                );
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One thread drives every call, as a lean client does: a thread pool would
    // add wake-ups between its threads to each call and take CPU from the driver
    // on a small machine. Pod I/O (the fsync) runs on the blocking pool.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("localvol-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), BenchError> {
    let work = match &cli.work_dir {
        Some(p) => {
            std::fs::create_dir_all(p).map_err(|e| bench::csi::io_err(p, e))?;
            WorkDir {
                path: p.clone(),
                owned: false,
            }
        }
        None => {
            let p = std::env::temp_dir().join(format!("localvol-bench-{}", std::process::id()));
            std::fs::create_dir_all(&p).map_err(|e| bench::csi::io_err(&p, e))?;
            WorkDir {
                path: p,
                owned: true,
            }
        }
    };
    if let Command::Floor { n, loop_volumes } = cli.command {
        let kind = if loop_volumes {
            bench::floor::Kind::Loop {
                size: cli.size as u64,
                fs_type: cli.fs_type.unwrap_or_else(|| "ext4".into()),
            }
        } else {
            bench::floor::Kind::Dir
        };
        return floor(&work.path, cli.warmup, n, kind, cli.json).await;
    }
    let mut sc = bench::csi::storage_class(&cli.params, cli.fs_type.as_deref())
        .map_err(BenchError::Usage)?;
    sc.extra_create_metadata = cli.extra_create_metadata;
    if !sc.dropped.is_empty() {
        eprintln!(
            "localvol-bench: not passed on: {} (secret references, which the provisioner \
             resolves to Secrets; the bench sends no secrets)",
            sc.dropped.join(", ")
        );
    }
    let mut session =
        Session::open(&cli.endpoint, sc, cli.size, cli.block, work.path.clone()).await?;
    session.controller_publish = session.info.controller_publish && !cli.no_controller_publish;
    if cli.kubelet_dials {
        session.kubelet_dials = Some(cli.endpoint.clone());
    }
    // Installed once connected, so a driver that never answers can still be left
    // with Ctrl-C before anything was made.
    let (stop, _watch) = bench::Stop::on_signals(bench::UNDOING)?;
    session.stop = stop;
    let params = session.params.clone();
    // Names unique per run, so runs against the same driver never collide.
    let prefix = format!(
        "bench-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    );
    let info = &session.info;
    let mut out = json!({
        "driver": {"name": info.name, "version": info.version, "node_id": info.node_id},
        "endpoint": cli.endpoint,
        "access": if cli.block { "block" } else { "mount" },
        "parameters": params,
        "fs_type": session.fs_type,
        "extra_create_metadata": session.extra_create_metadata,
        "warmup_cycles": cli.warmup,
        "size_bytes": cli.size,
        "controller_publish": session.controller_publish,
        "controller_publish_advertised": info.controller_publish,
        "kubelet_dials": cli.kubelet_dials,
        "node_stage": info.node_stage,
        "access_mode": info.rwo_mode.as_str_name(),
    });
    let header = format!(
        "driver {} {} on node {}, {} volumes of {} bytes ({}), parameters {:?}{}{}\nControllerPublish: {}{}",
        info.name,
        info.version,
        info.node_id,
        if cli.block { "block" } else { "mount" },
        cli.size,
        info.rwo_mode.as_str_name(),
        params,
        match session.fs_type.as_str() {
            "" => String::new(),
            fs => format!(", fs_type {fs}"),
        },
        match cli.warmup {
            0 => String::new(),
            w if matches!(cli.command, Command::Rtt { .. }) => format!(", after {w} warmup rounds"),
            w => format!(", after {w} warmup cycles"),
        },
        match (session.controller_publish, info.controller_publish) {
            (true, _) => "yes (advertised)",
            (false, true) => "no (advertised, skipped by --no-controller-publish)",
            (false, false) => "no (not advertised)",
        },
        if cli.kubelet_dials {
            "\nnode calls: a connection each, with the kubelet's NodeGetCapabilities calls"
        } else {
            ""
        }
    );
    let in_flight = match cli.command {
        Command::Cycle { c, .. } | Command::Scale { c, .. } => c,
        _ => 1,
    };
    if !matches!(cli.command, Command::Rtt { .. }) {
        bench::warm_up(&session, cli.warmup, in_flight, &prefix).await?;
    }
    let mut table = String::new();
    match cli.command {
        Command::Cycle { n, c } => {
            out["command"] = json!("cycle");
            let r = bench::run_cycles(&session, n, c, &prefix, "cycles").await?;
            table += &format!(
                "{n} cycles, {} in flight, in {:.2} s: {:.1} cycles/s\n",
                r.concurrency,
                r.seconds,
                r.per_second()
            );
            table += &bench::rpcs_table(&r.timings);
            merge(&mut out, r.to_json());
        }
        Command::Scale {
            existing,
            n,
            c,
            fill_concurrency,
            published,
        } => {
            out["command"] = json!("scale");
            let r = bench::scale(
                &session,
                existing,
                n,
                c,
                fill_concurrency,
                published,
                &prefix,
            )
            .await?;
            let idle = format!(
                "{existing} idle volumes ({})",
                if published {
                    "published"
                } else {
                    "not published"
                }
            );
            table += &format!(
                "{n} cycles, {c} in flight: {:.1} cycles/s with 0 volumes, {:.1} with {idle}: ratio {:.3}\n",
                r["without"]["cycles_per_second"].as_f64().unwrap_or(0.0),
                r["with"]["cycles_per_second"].as_f64().unwrap_or(0.0),
                r["ratio"].as_f64().unwrap_or(0.0),
            );
            table += &format!(
                "created {existing} idle volumes at {:.1}/s, deleted at {:.1}/s\n",
                r["fill"]["per_second"].as_f64().unwrap_or(0.0),
                r["delete"]["per_second"].as_f64().unwrap_or(0.0),
            );
            table += &format!(
                "each phase measured after sync(2): {:.2} s before the first, {:.2} s before the second\n",
                r["settle_seconds"][0].as_f64().unwrap_or(0.0),
                r["settle_seconds"][1].as_f64().unwrap_or(0.0),
            );
            if published {
                table += &format!(
                    "published them at {:.1}/s, unpublished at {:.1}/s\n",
                    r["publish"]["per_second"].as_f64().unwrap_or(0.0),
                    r["unpublish"]["per_second"].as_f64().unwrap_or(0.0),
                );
            }
            table += &rpc_rows("with 0 volumes", &r["without"]["rpcs"]);
            table += &rpc_rows(&format!("with {idle}"), &r["with"]["rpcs"]);
            merge(&mut out, r);
        }
        Command::Snapshot { mib } => {
            out["command"] = json!("snapshot");
            if !info.snapshots {
                let msg = format!(
                    "driver {} does not advertise CREATE_DELETE_SNAPSHOT; nothing to measure",
                    info.name
                );
                out["unsupported"] = json!(msg);
                table += &format!("{msg}\n");
            } else {
                let r = bench::snapshot(&session, mib, &prefix).await?;
                table += &format!(
                    "{mib} MiB written in {:.3} s; CreateSnapshot {:.3} s (ready after {:.3} s); restore (CreateVolume from snapshot) {:.3} s\n\
                     DeleteSnapshot {:.3} s; DeleteVolume of the volume holding the {mib} MiB {:.3} s\n",
                    r["write_seconds"].as_f64().unwrap_or(0.0),
                    r["create_snapshot_seconds"].as_f64().unwrap_or(0.0),
                    r["snapshot_ready_seconds"].as_f64().unwrap_or(0.0),
                    r["restore_seconds"].as_f64().unwrap_or(0.0),
                    r["delete_snapshot_seconds"].as_f64().unwrap_or(0.0),
                    r["delete_volume_seconds"].as_f64().unwrap_or(0.0),
                );
                merge(&mut out, r);
            }
        }
        Command::Rtt { n } => {
            out["command"] = json!("rtt");
            let r = bench::round_trips(&session, n, cli.warmup).await?;
            table += &format!(
                "{n} rounds of calls that do no work, one call at a time, in {:.2} s\n",
                r["seconds"].as_f64().unwrap_or(0.0)
            );
            table += &rpc_rows("round trips", &r["rpcs"]);
            merge(&mut out, r);
        }
        Command::Floor { .. } => unreachable!("measured before connecting"),
        Command::Io {
            compare_dir,
            file_mib,
            random_seconds,
            rounds,
        } => {
            out["command"] = json!("io");
            let opts = bench::io::IoOptions {
                file_mib,
                random_seconds,
                rounds,
            };
            let compare = compare_dir.unwrap_or_else(|| work.path.clone());
            let r = bench::io(&session, opts, compare, &prefix).await?;
            table += &format!(
                "  {:<22} {:>12} {:>12} {:>8}   (medians of {} rounds)\n",
                "pattern (MiB/s)", "volume", "plain file", "ratio", r["rounds"]
            );
            for (label, key, ratio) in [
                ("sequential write 1M", "seq_write_mib_s", "seq_write"),
                ("sequential read 1M", "seq_read_mib_s", "seq_read"),
                ("random write 4K", "rand_write_mib_s", "rand_write"),
                ("random read 4K", "rand_read_mib_s", "rand_read"),
            ] {
                table += &format!(
                    "  {:<22} {:>12.1} {:>12.1} {:>8.3}\n",
                    label,
                    r["volume"][key].as_f64().unwrap_or(0.0),
                    r["plain"][key].as_f64().unwrap_or(0.0),
                    r["ratio"][ratio].as_f64().unwrap_or(0.0),
                );
            }
            merge(&mut out, r);
        }
    }
    if let Some(pid) = cli.driver_pid {
        let kib = peak_rss_kib(pid);
        out["driver_peak_rss_kib"] = json!(kib);
        match kib {
            Some(k) => table += &format!("driver peak RSS (VmHWM): {:.1} MiB\n", k as f64 / 1024.0),
            None => table += &format!("driver peak RSS: /proc/{pid}/status unreadable\n"),
        }
    }
    if cli.json {
        println!("{out}");
    } else {
        print!("{header}\n{table}");
    }
    Ok(())
}

/// The floor run: no driver, so none of the driver's header or memory.
async fn floor(
    dir: &std::path::Path,
    warmup: usize,
    n: usize,
    kind: bench::floor::Kind,
    as_json: bool,
) -> Result<(), BenchError> {
    let dir = dir.to_path_buf();
    let what = match &kind {
        bench::floor::Kind::Dir => "directory".to_string(),
        bench::floor::Kind::Loop { size, fs_type } => format!("{fs_type} loop ({size} bytes)"),
    };
    // The floor's mounts and loop devices are the bench's own: an interrupted run
    // must undo them, so Ctrl-C or SIGTERM ends it after the cycle under way.
    let (stop, watch) = bench::Stop::on_signals("stopping after the cycle under way")?;
    let timings =
        tokio::task::spawn_blocking(move || bench::floor::measure(&dir, warmup, n, &kind, &stop))
            .await;
    drop(watch);
    let timings = timings??;
    let n = timings
        .summaries()
        .first()
        .map(|(_, s)| s.count)
        .unwrap_or(0);
    if n == 0 {
        eprintln!("localvol-bench: stopped before the first floor cycle; nothing to report");
        return Ok(());
    }
    let mkfs = timings.p50_ms(bench::floor::MKFS);
    let floor = bench::floor::floor_of(&timings);
    let kubelet = timings.p50_ms(bench::floor::KUBELET).unwrap_or(0.0);
    let per_second = 1.0 / floor.as_secs_f64();
    let rpcs = bench::rpcs_json(&timings);
    if as_json {
        let out = json!({
            "command": "floor",
            "volume": what,
            "cycles": n,
            "warmup_cycles": warmup,
            "mkfs_share_of_floor": mkfs.map(|m| m / (floor.as_secs_f64() * 1000.0)),
            "floor_ms": floor.as_secs_f64() * 1000.0,
            "floor_cycles_per_second": per_second,
            "kubelet_ms": kubelet,
            "steps": rpcs,
        });
        println!("{out}");
    } else {
        print!(
            "{n} floor cycles, no driver: the steps a durable {what} volume cycle cannot skip\n{}\
             floor (sum of the p50s, background and kubelet steps excluded): {:.3} ms, at most {:.1} cycles/s at 1 in flight\n\
             with kubelet's directories, as the cycle command does them: {:.3} ms, at most {:.1} cycles/s\n",
            bench::rpcs_table(&timings),
            floor.as_secs_f64() * 1000.0,
            per_second,
            floor.as_secs_f64() * 1000.0 + kubelet,
            1000.0 / (floor.as_secs_f64() * 1000.0 + kubelet),
        );
        if let Some(m) = mkfs {
            println!(
                "mkfs: {m:.3} ms, {:.0}% of the floor",
                100.0 * m / (floor.as_secs_f64() * 1000.0)
            );
        }
    }
    Ok(())
}

fn merge(out: &mut Value, more: Value) {
    if let (Value::Object(o), Value::Object(m)) = (out, more) {
        o.extend(m);
    }
}

/// Table rows from the JSON form, for sub-runs that are reported side by side.
fn rpc_rows(title: &str, rpcs: &Value) -> String {
    let mut s = format!(
        "  {:<26} {:>7} {:>9} {:>9} {:>9}   ({title})\n",
        "step", "count", "p50 ms", "p99 ms", "max ms"
    );
    for r in rpcs.as_array().into_iter().flatten() {
        s += &format!(
            "  {:<26} {:>7} {:>9.3} {:>9.3} {:>9.3}\n",
            r["rpc"].as_str().unwrap_or("?"),
            r["count"].as_u64().unwrap_or(0),
            r["p50_ms"].as_f64().unwrap_or(0.0),
            r["p99_ms"].as_f64().unwrap_or(0.0),
            r["max_ms"].as_f64().unwrap_or(0.0),
        );
    }
    s
}
