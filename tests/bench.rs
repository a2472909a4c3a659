//! Smoke tests of `localvol-bench` against the real driver: it runs, cleans up
//! and reports figures. Nothing about speed is asserted.

mod common;

use std::process::Command;

use serde_json::Value;

fn bench(d: &common::Driver, args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_localvol-bench"))
        .arg("--endpoint")
        .arg(format!("unix://{}", d.socket.display()))
        .arg("--work-dir")
        .arg(d.path("bench"))
        .arg("--driver-pid")
        .arg(d.pid().to_string())
        .arg("--json")
        .args(args)
        .output()
        .expect("run localvol-bench");
    assert!(
        out.status.success(),
        "localvol-bench {args:?} failed: {}\n{}\ndriver log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
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
