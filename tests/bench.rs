//! Smoke tests of `localvol-bench` against the real driver: it runs, cleans up
//! and reports figures. Nothing about speed is asserted.

mod common;

use std::process::Command;

use serde_json::Value;

/// The bench against `d`, with `args` after the common flags.
fn command(d: &common::Driver, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_localvol-bench"));
    cmd.arg("--endpoint")
        .arg(format!("unix://{}", d.socket.display()))
        .arg("--work-dir")
        .arg(d.path("bench"))
        .arg("--driver-pid")
        .arg(d.pid().to_string())
        .arg("--json")
        .args(args);
    cmd
}

/// Runs the bench and expects it to fail; returns its stderr.
fn bench_fails(d: &common::Driver, args: &[&str]) -> String {
    let out = command(d, args).output().expect("run localvol-bench");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} succeeded: {stderr}");
    stderr
}

fn bench(d: &common::Driver, args: &[&str]) -> Value {
    bench_with_stderr(d, args).0
}

fn bench_with_stderr(d: &common::Driver, args: &[&str]) -> (Value, String) {
    let out = command(d, args).output().expect("run localvol-bench");
    assert!(
        out.status.success(),
        "localvol-bench {args:?} failed: {}\n{}\ndriver log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    let r = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    (r, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// How many times the run made `step`.
fn count(run: &Value, step: &str) -> u64 {
    run["rpcs"]
        .as_array()
        .expect("rpcs array")
        .iter()
        .find(|r| r["rpc"] == step)
        .map_or(0, |r| r["count"].as_u64().unwrap())
}

fn rpc_names(run: &Value) -> Vec<String> {
    run["rpcs"]
        .as_array()
        .expect("rpcs array")
        .iter()
        .map(|r| {
            assert!(r["count"].as_u64().unwrap() > 0);
            assert!(r["p50_ms"].as_f64().unwrap() <= r["p99_ms"].as_f64().unwrap());
            r["rpc"].as_str().unwrap().to_string()
        })
        .collect()
}

/// No volume and no mount may outlive a run.
async fn assert_clean(d: &common::Driver) {
    let mut c = d.clients().await;
    let left = c
        .controller
        .list_volumes(localvol::proto::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(left.is_empty(), "volumes left behind: {left:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let bench_dir = d.path("bench");
    assert!(
        localvol::mount::parse_mountinfo(&mounts)
            .iter()
            .all(|m| !m.mount_point.starts_with(&bench_dir)),
        "mounts left below {}",
        bench_dir.display()
    );
}

#[tokio::test]
async fn cycle_reports_throughput_and_every_rpc() {
    if !common::need_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let d = common::Driver::start().await;
    let r = bench(&d, &["cycle", "-n", "5", "-c", "2"]);
    assert_eq!(r["cycles"], 5);
    assert!(r["cycles_per_second"].as_f64().unwrap() > 0.0);
    assert!(r["driver_peak_rss_kib"].as_u64().unwrap() > 0);
    let names = rpc_names(&r);
    for rpc in [
        "CreateVolume",
        "ControllerPublishVolume",
        "NodeStageVolume",
        "NodePublishVolume",
        "NodeUnpublishVolume",
        "NodeUnstageVolume",
        "ControllerUnpublishVolume",
        "DeleteVolume",
    ] {
        assert!(names.iter().any(|n| n == rpc), "{rpc} missing: {names:?}");
    }
    assert_clean(&d).await;
}

#[tokio::test]
async fn rtt_times_calls_that_do_no_work() {
    if !common::need_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let d = common::Driver::start().await;
    let r = bench(&d, &["--warmup", "3", "rtt", "-n", "20"]);
    assert_eq!(r["command"], "rtt");
    assert_eq!(r["rounds"], 20);
    for rpc in ["NodeGetCapabilities", "ControllerGetCapabilities", "Probe"] {
        assert_eq!(count(&r, rpc), 20, "{rpc}");
    }
    assert_clean(&d).await;
}

/// Runs `floor` with `args` in a fresh directory and checks it left neither files,
/// mounts nor loop devices there; returns its report.
fn floor(args: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_localvol-bench"))
        .arg("--work-dir")
        .arg(dir.path())
        .args(["--json", "floor"])
        .args(args)
        .output()
        .expect("run localvol-bench");
    assert!(
        out.status.success(),
        "floor {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "floor left files behind"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        localvol::mount::parse_mountinfo(&mounts)
            .iter()
            .all(|m| !m.mount_point.starts_with(dir.path())),
        "floor left mounts behind"
    );
    assert!(
        localvol::loopdev::attached()
            .iter()
            .all(|(_, file)| !file.starts_with(dir.path())),
        "floor left loop devices attached"
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r["floor_ms"].as_f64().unwrap() > 0.0);
    r
}

/// `floor` needs no driver: it times the kernel steps of a cycle in the work dir.
#[test]
fn floor_times_each_step_of_a_directory_cycle() {
    if !common::need_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let r = floor(&["-n", "5"]);
    assert_eq!(r["cycles"], 5);
    let steps = r["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 9, "{steps:?}");
    assert!(steps.iter().all(|s| s["count"] == 5));
    assert!(r["mkfs_share_of_floor"].is_null());
    // Kubelet's directories are reported beside the floor, not in it.
    assert!(r["kubelet_ms"].as_f64().unwrap() > 0.0);
}

#[test]
fn floor_of_loop_volumes_reports_the_share_of_mkfs() {
    if !common::need_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let r = floor(&["--loop", "-n", "2"]);
    let share = r["mkfs_share_of_floor"].as_f64().unwrap();
    assert!(share > 0.0 && share < 1.0, "{share}");
}

#[tokio::test]
async fn scale_measures_with_and_without_idle_volumes_and_deletes_them() {
    if !common::need_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let d = common::Driver::start().await;
    let r = bench(&d, &["scale", "--existing", "20", "-n", "5"]);
    assert_eq!(r["existing"], 20);
    assert_eq!(r["fill"]["volumes"], 20);
    assert!(r["without"]["cycles_per_second"].as_f64().unwrap() > 0.0);
    assert!(r["with"]["cycles_per_second"].as_f64().unwrap() > 0.0);
    assert!(r["ratio"].as_f64().unwrap() > 0.0);
    assert!(!rpc_names(&r["with"]).is_empty());
    assert_clean(&d).await;
}

#[tokio::test]
async fn snapshot_without_support_says_so_and_succeeds() {
    if !common::need_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let d = common::Driver::start().await;
    let r = bench(&d, &["snapshot", "--mib", "1"]);
    if r.get("unsupported").is_some() {
        assert!(r["unsupported"]
            .as_str()
            .unwrap()
            .contains("CREATE_DELETE_SNAPSHOT"));
    } else {
        assert!(r["create_snapshot_seconds"].as_f64().unwrap() >= 0.0);
    }
    assert_clean(&d).await;
}

#[tokio::test]
async fn io_compares_a_volume_with_a_plain_file() {
    if !common::need_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let d = common::Driver::start().await;
    // A directory volume: the same code path as loop volumes, on any machine.
    let r = bench(&d, &["io", "--file-mib", "2", "--random-seconds", "0.05"]);
    for side in ["volume", "plain"] {
        for k in [
            "seq_write_mib_s",
            "seq_read_mib_s",
            "rand_write_iops",
            "rand_read_iops",
        ] {
            assert!(r[side][k].as_f64().unwrap() > 0.0, "{side} {k}: {r}");
        }
    }
    assert!(r["ratio"]["seq_read"].as_f64().unwrap() > 0.0);
    assert_eq!(r["rounds"], 3);
    assert_eq!(r["ratio_per_round"].as_array().unwrap().len(), 3);
    assert_clean(&d).await;
}

#[tokio::test]
async fn scale_with_published_volumes_takes_them_down_again() {
    if !common::need_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let d = common::Driver::start().await;
    let r = bench(
        &d,
        &[
            "scale",
            "--existing",
            "6",
            "-n",
            "4",
            "-c",
            "2",
            "--published",
        ],
    );
    assert_eq!(r["existing"], 6);
    assert_eq!(r["published"], true);
    assert_eq!(r["fill"]["volumes"], 6);
    assert_eq!(r["publish"]["volumes"], 6);
    assert_eq!(r["unpublish"]["volumes"], 6);
    let published = rpc_names(&r["publish"]);
    assert!(published.iter().any(|n| n == "NodePublishVolume"));
    assert!(r["without"]["cycles_per_second"].as_f64().unwrap() > 0.0);
    assert!(r["with"]["cycles_per_second"].as_f64().unwrap() > 0.0);
    assert!(r["ratio"].as_f64().unwrap() > 0.0);
    assert!(rpc_names(&r["with"])
        .iter()
        .any(|n| n == "NodeUnpublishVolume"));
    assert_clean(&d).await;
}

#[tokio::test]
async fn no_controller_publish_skips_the_controller_publish_rpcs() {
    if !common::need_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let d = common::Driver::start().await;
    let r = bench(
        &d,
        &["--no-controller-publish", "cycle", "-n", "3", "-c", "1"],
    );
    assert_eq!(r["cycles"], 3);
    assert!(r["cycles_per_second"].as_f64().unwrap() > 0.0);
    assert_eq!(r["controller_publish"], false);
    assert_eq!(r["controller_publish_advertised"], true);
    // A ReadWriteOnce claim, as Kubernetes maps it for a driver that advertises
    // SINGLE_NODE_MULTI_WRITER on both services.
    assert_eq!(r["access_mode"], "SINGLE_NODE_MULTI_WRITER");
    let names = rpc_names(&r);
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("ControllerPublish") || n.starts_with("ControllerUnpublish")),
        "{names:?}"
    );
    for rpc in ["CreateVolume", "NodePublishVolume", "DeleteVolume"] {
        assert!(names.iter().any(|n| n == rpc), "{rpc} missing: {names:?}");
    }
    assert_clean(&d).await;
}

/// `--kubelet-dials`: node calls as the kubelet makes them, with its capability
/// questions (two before staging, two before publishing, one before unstaging).
#[tokio::test]
async fn kubelet_dials_adds_the_kubelets_capability_calls() {
    if !common::need_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let d = common::Driver::start().await;
    let r = bench(
        &d,
        &[
            "--no-controller-publish",
            "--kubelet-dials",
            "cycle",
            "-n",
            "3",
            "-c",
            "2",
        ],
    );
    assert_eq!(r["cycles"], 3);
    assert_eq!(r["kubelet_dials"], true);
    let count = |rpc: &str| {
        r["rpcs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["rpc"] == rpc)
            .map_or(0, |x| x["count"].as_u64().unwrap())
    };
    assert_eq!(count("NodeGetCapabilities"), 15, "{r}");
    for rpc in [
        "NodeStageVolume",
        "NodePublishVolume",
        "NodeUnpublishVolume",
        "NodeUnstageVolume",
    ] {
        assert_eq!(count(rpc), 3, "{rpc}: {r}");
    }
    assert_clean(&d).await;
}

/// StorageClass parameters as external-provisioner passes them: no
/// csi.storage.k8s.io/ key reaches CreateVolume, its fstype goes into the
/// capability, secret references are left out with a note, and a class the
/// provisioner would refuse is refused before anything is made.
#[tokio::test]
async fn storage_class_parameters_are_handled_as_the_provisioner_does() {
    if !common::need_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let d = common::Driver::start().await;
    let (r, stderr) = bench_with_stderr(
        &d,
        &[
            "--param",
            "type=loop",
            "--param",
            "csi.storage.k8s.io/fstype=ext4",
            "--param",
            "csi.storage.k8s.io/provisioner-secret-name=s",
            "--param",
            "csi.storage.k8s.io/node-stage-secret-namespace=ns",
            "cycle",
            "-n",
            "1",
        ],
    );
    assert_eq!(r["parameters"], serde_json::json!({"type": "loop"}));
    assert_eq!(r["fs_type"], "ext4");
    assert_eq!(r["cycles"], 1);
    for key in [
        "csi.storage.k8s.io/provisioner-secret-name",
        "csi.storage.k8s.io/node-stage-secret-namespace",
    ] {
        assert!(stderr.contains(key), "no note of {key}: {stderr}");
    }
    // The PVC's and PV's names, which the provisioner adds with
    // --extra-create-metadata (as deploy/ runs it): localvol keeps them.
    let r = bench(&d, &["--extra-create-metadata", "cycle", "-n", "1"]);
    assert_eq!(r["extra_create_metadata"], true);
    assert_eq!(r["cycles"], 1);
    // Passed on as a parameter, it would be one localvol keeps and never reads, and
    // the volume would be ext4; in the capability, localvol refuses it.
    let stderr = bench_fails(
        &d,
        &[
            "--param",
            "type=loop",
            "--param",
            "csi.storage.k8s.io/fstype=btrfs",
            "cycle",
            "-n",
            "1",
        ],
    );
    assert!(
        stderr.contains("CreateVolume failed") && stderr.contains("\"btrfs\" is not supported"),
        "{stderr}"
    );
    for (args, why) in [
        (
            &["--param", "csi.storage.k8s.io/pvc/name=p"][..],
            "refuses unknown keys",
        ),
        (
            &[
                "--param",
                "fsType=ext4",
                "--param",
                "csi.storage.k8s.io/fstype=ext4",
            ][..],
            "given twice",
        ),
        (
            &[
                "--fs-type",
                "xfs",
                "--param",
                "csi.storage.k8s.io/fstype=ext4",
            ][..],
            "contradicts",
        ),
    ] {
        let stderr = bench_fails(&d, &[args, &["cycle", "-n", "1"]].concat());
        assert!(stderr.contains(why), "{args:?}: {stderr}");
    }
    assert_clean(&d).await;
}

/// `--fs-type` sets the mount capability's fs_type of every call.
#[tokio::test]
async fn fs_type_goes_into_the_mount_capability() {
    if !common::need_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let d = common::Driver::start().await;
    let r = bench(
        &d,
        &[
            "--param",
            "type=loop",
            "--fs-type",
            "ext4",
            "cycle",
            "-n",
            "2",
        ],
    );
    assert_eq!(r["fs_type"], "ext4");
    assert_eq!(r["cycles"], 2);
    let stderr = bench_fails(
        &d,
        &[
            "--param",
            "type=loop",
            "--fs-type",
            "btrfs",
            "cycle",
            "-n",
            "1",
        ],
    );
    assert!(stderr.contains("\"btrfs\" is not supported"), "{stderr}");
    assert_clean(&d).await;
}

/// A block cycle's pod writes and flushes 4 KiB on the published device, under
/// the same step name as a filesystem cycle's.
#[tokio::test]
async fn block_cycles_write_to_the_device() {
    if !common::need_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let d = common::Driver::start().await;
    let r = bench(&d, &["--param", "type=loop", "--block", "cycle", "-n", "2"]);
    assert_eq!(r["access"], "block");
    assert_eq!(count(&r, "write+fsync 4KiB"), 2, "{r}");
    assert_eq!(count(&r, "NodePublishVolume"), 2);
    assert_clean(&d).await;
}

/// Warmup cycles run and are undone like the others, but are in no figure.
#[tokio::test]
async fn warmup_cycles_are_in_no_figure() {
    if !common::need_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let d = common::Driver::start().await;
    let r = bench(&d, &["--warmup", "3", "cycle", "-n", "2"]);
    assert_eq!(r["cycles"], 2);
    assert_eq!(r["warmup_cycles"], 3);
    for step in ["CreateVolume", "write+fsync 4KiB", "DeleteVolume"] {
        assert_eq!(count(&r, step), 2, "{step}: {r}");
    }
    assert_clean(&d).await;
    let r = floor(&["--warmup", "2", "-n", "3"]);
    assert_eq!(r["cycles"], 3);
    assert_eq!(r["warmup_cycles"], 2);
    assert!(r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["count"] == 3));
}

/// The bench as a child process that is killed if the test ends first.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the bench, sends `signal` once a stderr line contains `when`, and
/// returns its exit status and stderr.
fn interrupt(
    d: &common::Driver,
    args: &[&str],
    when: &str,
    signal: nix::sys::signal::Signal,
) -> (std::process::ExitStatus, String) {
    use std::io::BufRead;
    use std::time::{Duration, Instant};
    let mut child = Running(
        command(d, args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start localvol-bench"),
    );
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no {when:?} on stderr: {seen}"));
        seen += &format!("{line}\n");
        if line.contains(when) {
            break;
        }
    }
    let pid = nix::unistd::Pid::from_raw(child.0.id() as i32);
    nix::sys::signal::kill(pid, signal).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still running after {signal}: {seen}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // The reader ends with the child's stderr.
    seen.extend(rx.iter().map(|l| format!("{l}\n")));
    (status, seen)
}

/// Ctrl-C in a long run: no new cycle starts, the ones under way undo their steps,
/// and the run says it was interrupted.
#[tokio::test]
async fn sigint_stops_cycles_and_leaves_nothing() {
    interrupted_run_leaves_nothing(
        &["cycle", "-n", "1000000", "-c", "2"],
        "cycles:",
        nix::sys::signal::Signal::SIGINT,
    )
    .await;
}

/// SIGTERM while `scale` fills the driver: the volumes made so far are deleted.
#[tokio::test]
async fn sigterm_during_a_fill_deletes_the_idle_volumes() {
    interrupted_run_leaves_nothing(
        &["scale", "--existing", "1000000", "-n", "2"],
        "creating idle volumes:",
        nix::sys::signal::Signal::SIGTERM,
    )
    .await;
}

/// Sends `signal` once `args`' run has printed `started`: the run must fail,
/// say it was interrupted, and leave the driver as it found it.
async fn interrupted_run_leaves_nothing(
    args: &[&str],
    started: &str,
    signal: nix::sys::signal::Signal,
) {
    if !common::need_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let d = common::Driver::start().await;
    let (status, stderr) = interrupt(&d, args, started, signal);
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("interrupted by SIGINT or SIGTERM"),
        "{stderr}"
    );
    assert_clean(&d).await;
}

/// The cost of one gRPC round trip to the real driver, with nothing else in it:
/// p50 and p99 printed (run with `cargo test --release --test bench -- --ignored
/// --nocapture`). GetPluginInfo is answered on the gRPC thread; Probe's check of
/// the root runs on the blocking pool like every call that touches the disk. Both
/// clients: tonic's `Channel` (a queue and a worker task in front of the
/// connection) and the benchmark's `Direct` connection.
#[tokio::test]
#[ignore]
async fn round_trip_floor() {
    use localvol::proto::identity_client::IdentityClient;
    use localvol::proto::{GetPluginInfoRequest, ProbeRequest};
    let d = common::Driver::start().await;
    let channel = d.clients().await.identity;
    let direct = IdentityClient::with_origin(
        localvol::client::connect_direct(&d.socket).await.unwrap(),
        localvol::client::ORIGIN.parse().unwrap(),
    );
    fn report(name: &str, client: &str, mut took: Vec<f64>) {
        took.sort_by(f64::total_cmp);
        println!(
            "{name} ({client}): p50 {:.0} µs, p99 {:.0} µs",
            took[took.len() / 2],
            took[took.len() * 99 / 100]
        );
    }
    macro_rules! time_calls {
        ($client:expr, $label:literal) => {
            for (name, probe) in [("GetPluginInfo", false), ("Probe", true)] {
                let mut took = vec![];
                for _ in 0..2000 {
                    let start = std::time::Instant::now();
                    if probe {
                        $client.probe(ProbeRequest {}).await.unwrap();
                    } else {
                        $client
                            .get_plugin_info(GetPluginInfoRequest {})
                            .await
                            .unwrap();
                    }
                    took.push(start.elapsed().as_secs_f64() * 1e6);
                }
                report(name, $label, took);
            }
        };
    }
    for _ in 0..2 {
        let (mut c, mut d) = (channel.clone(), direct.clone());
        time_calls!(c, "Channel");
        time_calls!(d, "Direct");
    }
}
