//! `localvol status | volumes | snapshots` through the real binary, with the driver
//! running and after it stopped.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn run(args: &[&str], root: &Path) -> (i32, String, String) {
    let out = Command::new(binary())
        .args(args)
        .arg("--root")
        .arg(root)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn volumes_json(root: &Path) -> Vec<serde_json::Value> {
    let (code, out, err) = run(&["volumes", "--output", "json"], root);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn paths(v: &serde_json::Value) -> Vec<PathBuf> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| PathBuf::from(p.as_str().unwrap()))
        .collect()
}

#[tokio::test]
async fn volumes_show_pvc_mounts_and_health_with_the_driver_running_and_stopped() {
    if !need_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut d = Driver::start().await;
    let mut c = d.clients().await;
    let vol = c
        .create(
            "pvc-status",
            64 * MIB,
            &[
                ("type", "dir"),
                ("csi.storage.k8s.io/pvc/namespace", "shop"),
                ("csi.storage.k8s.io/pvc/name", "orders"),
            ],
            rwo(),
        )
        .await;
    let idle = c.create("pvc-idle", MIB, &[("type", "dir")], rwo()).await;
    let staging = d.path("kubelet/plugins/kubernetes.io/csi/localvol.csi.io/h1/globalmount");
    let target = d.path("kubelet/pods/p1/volumes/kubernetes.io~csi/pv1/mount");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    c.stage(&vol.volume_id, &staging, rwo()).await.unwrap();
    c.publish(&vol.volume_id, &staging, &target, rwo(), false)
        .await
        .unwrap();
    std::fs::write(target.join("f"), vec![1u8; 256 * 1024]).unwrap();

    let check = |rows: &[serde_json::Value]| {
        assert_eq!(rows.len(), 2, "{rows:?}");
        let v = rows
            .iter()
            .find(|r| r["id"] == vol.volume_id.as_str())
            .expect("volume listed");
        assert_eq!(v["pvc"], "shop/orders");
        assert_eq!(v["type"], "dir");
        assert_eq!(v["size_bytes"], 64 * MIB);
        assert!(v["used_bytes"].as_u64().unwrap() >= 256 * 1024, "{v}");
        assert_eq!(paths(&v["staged_at"]), vec![staging.clone()]);
        assert_eq!(paths(&v["published_at"]), vec![target.clone()]);
        assert_eq!(v["problems"].as_array().unwrap().len(), 0, "{v}");
        // The whole record, as the driver keeps it in its slot file.
        assert_eq!(v["record"]["name"], "pvc-status");
        assert_eq!(
            v["record"]["parameters"]["csi.storage.k8s.io/pvc/name"],
            "orders"
        );
        let i = rows
            .iter()
            .find(|r| r["id"] == idle.volume_id.as_str())
            .unwrap();
        assert!(i["pvc"].is_null());
        assert!(i["published_at"].as_array().unwrap().is_empty());
    };
    check(&volumes_json(&d.root));

    // Stopped: the same answer from the records and the mount table.
    assert!(d.terminate().success());
    check(&volumes_json(&d.root));

    // A volume whose data vanished is reported, in the summary and in its row.
    let data = d.root.join("volumes").join(&idle.volume_id);
    std::fs::rename(&data, d.path("moved-away")).unwrap();
    let (code, out, err) = run(&["status"], &d.root);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("volumes:      2 (1 staged, 1 published)"),
        "{out}"
    );
    assert!(out.contains("1 problem(s)"), "{out}");
    assert!(
        out.contains(&format!("volume {}: data", idle.volume_id)),
        "{out}"
    );
    assert!(
        out.contains("shop/orders") && out.contains(&target.display().to_string()),
        "{out}"
    );
    let (code, out, _) = run(&["status", "--output", "json"], &d.root);
    assert_eq!(code, 0);
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["summary"]["volumes"], 2);
    assert!(s["summary"]["free_bytes"].as_u64().unwrap() > 0);
    let (code, out, _) = run(&["snapshots", "--output", "json"], &d.root);
    assert_eq!((code, out.trim()), (0, "[]"));
}

#[test]
fn a_missing_or_foreign_root_is_an_error_that_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = run(&["status"], &dir.path().join("nope"));
    assert_eq!(code, 1);
    assert!(out.is_empty());
    assert!(
        err.contains("does not exist") && err.contains("--root"),
        "{err}"
    );
    let (code, _, err) = run(&["volumes"], dir.path());
    assert_eq!(code, 1);
    assert!(
        err.contains("not a localvol root") && err.contains("--root"),
        "{err}"
    );
}
