//! Directory volumes end to end through the real binary: real bind mounts, real
//! data, read-only that really refuses writes, SIGKILL and restart.

mod common;

use common::*;
use localvol::proto::volume_capability::access_mode::Mode;
use localvol::proto::*;
use std::fs;
use std::time::Duration;

/// What `localvol status` prints for `root`.
fn status_of(root: &std::path::Path) -> String {
    let out = std::process::Command::new(binary())
        .args(["status", "--root"])
        .arg(root)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}
use tonic::Code;

#[tokio::test]
async fn dir_volume_full_cycle_with_real_data() {
    let d = Driver::start().await;
    let mut c = d.clients().await;
    let vol = c
        .create("pvc-cycle", 64 * MIB, &[("type", "dir")], rwo())
        .await;
    assert_eq!(vol.capacity_bytes, 64 * MIB);
    assert_eq!(vol.accessible_topology[0].segments[TOPOLOGY_KEY], NODE);

    let staging = d.path("kubelet/staging/pv1/globalmount");
    fs::create_dir_all(&staging).unwrap();
    let target = d.path("kubelet/pods/p1/volumes/pv1/mount");
    fs::create_dir_all(target.parent().unwrap()).unwrap();

    c.stage(&vol.volume_id, &staging, rwo()).await.unwrap();
    c.stage(&vol.volume_id, &staging, rwo()).await.unwrap(); // idempotent
    assert!(is_mounted(&staging));
    c.publish(&vol.volume_id, &staging, &target, rwo(), false)
        .await
        .unwrap();
    c.publish(&vol.volume_id, &staging, &target, rwo(), false)
        .await
        .unwrap(); // idempotent
    assert!(is_mounted(&target));

    fs::write(target.join("hello.txt"), b"written by pod 1").unwrap();
    // The same data is visible in a second pod's read-only mount, which refuses writes.
    let ro_target = d.path("kubelet/pods/p2/volumes/pv1/mount");
    fs::create_dir_all(ro_target.parent().unwrap()).unwrap();
    c.publish(&vol.volume_id, &staging, &ro_target, rwo(), true)
        .await
        .unwrap();
    assert_eq!(
        fs::read(ro_target.join("hello.txt")).unwrap(),
        b"written by pod 1"
    );
    let err = fs::write(ro_target.join("nope"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    // The same target asked read-write: ALREADY_EXISTS.
    assert_code(
        c.publish(&vol.volume_id, &staging, &ro_target, rwo(), false)
            .await,
        Code::AlreadyExists,
    );

    // Stats of a published path.
    let stats = c
        .node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: vol.volume_id.clone(),
            volume_path: target.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.usage.len(), 2);
    assert!(stats.usage[0].total > 0);
    assert!(!stats.volume_condition.unwrap().abnormal);

    // Deleting a mounted volume is refused.
    assert_code(c.delete(&vol.volume_id).await, Code::FailedPrecondition);

    for t in [&target, &ro_target] {
        c.unpublish(&vol.volume_id, t).await.unwrap();
        c.unpublish(&vol.volume_id, t).await.unwrap(); // idempotent
        assert!(!is_mounted(t) && !t.exists());
    }
    c.unstage(&vol.volume_id, &staging).await.unwrap();
    c.unstage(&vol.volume_id, &staging).await.unwrap();
    assert!(!is_mounted(&staging));

    // Restage: data still there.
    c.stage(&vol.volume_id, &staging, rwo()).await.unwrap();
    assert_eq!(
        fs::read(staging.join("hello.txt")).unwrap(),
        b"written by pod 1"
    );
    c.unstage(&vol.volume_id, &staging).await.unwrap();

    let data = d.root.join("volumes").join(&vol.volume_id);
    assert!(data.is_dir());
    c.delete(&vol.volume_id).await.unwrap();
    c.delete(&vol.volume_id).await.unwrap();
    assert!(!data.exists(), "data removed");
}

/// DeleteVolume knows every mount of the data, also one another process made
/// after the driver last looked (the driver learns of it from the kernel's
/// report, not from a listing).
#[tokio::test]
async fn delete_sees_a_bind_made_by_another_process() {
    let d = Driver::start().await;
    let mut c = d.clients().await;
    // A first delete makes the driver look at every mount once.
    let first = c.create("pvc-first", MIB, &[("type", "dir")], rwo()).await;
    c.delete(&first.volume_id).await.unwrap();
    let vol = c.create("pvc-bound", MIB, &[("type", "dir")], rwo()).await;
    let staging = d.path("kubelet/staging/pv/globalmount");
    let elsewhere = d.path("elsewhere");
    fs::create_dir_all(&staging).unwrap();
    fs::create_dir_all(&elsewhere).unwrap();
    c.stage(&vol.volume_id, &staging, rwo()).await.unwrap();
    fs::write(staging.join("kept"), b"in use elsewhere").unwrap();
    let bound = std::process::Command::new("mount")
        .arg("--bind")
        .arg(&staging)
        .arg(&elsewhere)
        .status()
        .unwrap();
    assert!(bound.success());
    c.unstage(&vol.volume_id, &staging).await.unwrap();

    let err = c.delete(&vol.volume_id).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("elsewhere"), "{}", err.message());
    assert_eq!(
        fs::read(elsewhere.join("kept")).unwrap(),
        b"in use elsewhere"
    );

    nix::mount::umount2(&elsewhere, nix::mount::MntFlags::empty()).unwrap();
    c.delete(&vol.volume_id).await.unwrap();
}

#[tokio::test]
async fn sigkill_and_restart_keep_volumes_mounts_and_data() {
    let mut d = Driver::start().await;
    let mut c = d.clients().await;
    let mut vols = vec![];
    for i in 0..3 {
        vols.push(c.create(&format!("pvc-restart-{i}"), MIB, &[], rwo()).await);
    }
    let staging = d.path("staging");
    let target = d.path("target");
    fs::create_dir_all(&staging).unwrap();
    let v0 = vols[0].volume_id.clone();
    c.stage(&v0, &staging, rwo()).await.unwrap();
    c.publish(&v0, &staging, &target, rwo(), false)
        .await
        .unwrap();
    fs::write(target.join("data"), b"before the crash").unwrap();

    d.restart_after_kill9().await;
    let mut c = d.clients().await;

    let listed = c
        .controller
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut ids: Vec<_> = listed
        .entries
        .iter()
        .map(|e| e.volume.as_ref().unwrap().volume_id.clone())
        .collect();
    ids.sort();
    let mut want: Vec<_> = vols.iter().map(|v| v.volume_id.clone()).collect();
    want.sort();
    assert_eq!(ids, want);

    // The mounts survived the driver; the restarted driver knows them from the kernel.
    assert_eq!(fs::read(target.join("data")).unwrap(), b"before the crash");
    c.publish(&v0, &staging, &target, rwo(), false)
        .await
        .unwrap();
    c.unpublish(&v0, &target).await.unwrap();
    c.unstage(&v0, &staging).await.unwrap();
    assert!(!is_mounted(&target) && !is_mounted(&staging));

    // Data intact after restage; all deletes work.
    c.stage(&v0, &staging, rwo()).await.unwrap();
    assert_eq!(fs::read(staging.join("data")).unwrap(), b"before the crash");
    c.unstage(&v0, &staging).await.unwrap();
    for v in &vols {
        c.delete(&v.volume_id).await.unwrap();
    }
    let listed = c
        .controller
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.entries.is_empty());
}

#[tokio::test]
async fn sigterm_stops_cleanly_and_removes_the_socket() {
    let mut d = Driver::start().await;
    let mut c = d.clients().await;
    c.create("pvc-term", MIB, &[], rwo()).await;
    let status = d.terminate();
    assert!(status.success(), "{status}");
    assert!(!d.socket.exists());
    // A stale socket file left by a crash is replaced on the next start.
    let _stale = std::os::unix::net::UnixListener::bind(&d.socket).unwrap();
    drop(_stale);
    d.spawn().await;
    let mut c = d.clients().await;
    let probe = c
        .identity
        .probe(ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true));
}

#[tokio::test]
async fn interrupted_create_leftovers_are_removed_at_start() {
    let mut d = Driver::start().await;
    let mut c = d.clients().await;
    let kept = c.create("pvc-kept", MIB, &[], rwo()).await;
    d.kill9();
    // Data without a record: what a crash between "make data" and "write record" leaves.
    let orphan = d.root.join("volumes").join(localvol::ids::id_for_name(
        localvol::ids::Kind::Volume,
        "pvc-orphan",
    ));
    fs::create_dir_all(orphan.join("sub")).unwrap();
    fs::write(orphan.join("sub/f"), b"x").unwrap();
    // Something that is not ours is never touched.
    let foreign = d.root.join("volumes").join("not-a-volume");
    fs::create_dir_all(&foreign).unwrap();
    d.spawn().await;
    assert!(!orphan.exists(), "orphan removed at start-up");
    assert!(foreign.exists(), "foreign entry left alone");
    assert!(d.root.join("volumes").join(&kept.volume_id).exists());
    // Retrying the interrupted create works.
    let mut c = d.clients().await;
    let v = c.create("pvc-orphan", MIB, &[], rwo()).await;
    assert!(d.root.join("volumes").join(&v.volume_id).is_dir());
}

#[tokio::test]
async fn mount_flags_apply_and_symlink_targets_are_refused() {
    let d = Driver::start().await;
    let mut c = d.clients().await;
    let vol = c.create("pvc-flags", MIB, &[], rwo()).await;
    let staging = d.path("staging");
    fs::create_dir_all(&staging).unwrap();
    c.stage(&vol.volume_id, &staging, rwo()).await.unwrap();

    let target = d.path("t-noexec");
    let cap = mount_cap_fs(Mode::SingleNodeWriter, "", &["noexec", "nosuid"]);
    c.publish(&vol.volume_id, &staging, &target, cap, false)
        .await
        .unwrap();
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let m = localvol::mount::parse_mountinfo(&text)
        .into_iter()
        .rev()
        .find(|m| m.mount_point == target)
        .unwrap();
    assert!(
        m.options.contains("noexec") && m.options.contains("nosuid"),
        "{}",
        m.options
    );
    c.unpublish(&vol.volume_id, &target).await.unwrap();

    // A filesystem option on a directory volume is refused.
    let cap = mount_cap_fs(Mode::SingleNodeWriter, "", &["discard"]);
    assert_code(
        c.publish(&vol.volume_id, &staging, &target, cap, false)
            .await,
        Code::InvalidArgument,
    );
    assert!(!is_mounted(&target));

    // A symlink planted at the target must not redirect the mount.
    let outside = d.path("outside");
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("canary"), b"alive").unwrap();
    let link = d.path("t-link");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    assert_code(
        c.publish(&vol.volume_id, &staging, &link, rwo(), false)
            .await,
        Code::InvalidArgument,
    );
    assert!(!is_mounted(&outside));
    assert_eq!(fs::read(outside.join("canary")).unwrap(), b"alive");
    c.unstage(&vol.volume_id, &staging).await.unwrap();
}

#[tokio::test]
async fn deleted_data_leaves_through_the_trash_and_start_up_empties_it() {
    let mut d = Driver::start().await;
    let mut c = d.clients().await;
    let vol = c.create("pvc-trash", 64 * MIB, &[], rwo()).await;
    let data = d.root.join("volumes").join(&vol.volume_id);
    for i in 0..200 {
        fs::create_dir_all(data.join(format!("d{}", i % 10))).unwrap();
        fs::write(data.join(format!("d{}/f{i}", i % 10)), b"pod data").unwrap();
    }
    c.delete(&vol.volume_id).await.unwrap();
    assert!(
        !data.exists(),
        "the volume's data is out of volumes/ when Delete answers"
    );
    trash_emptied(&d.root).await;
    // The same name makes a fresh, empty volume.
    let again = c.create("pvc-trash", 64 * MIB, &[], rwo()).await;
    assert_eq!(again.volume_id, vol.volume_id);
    assert_eq!(fs::read_dir(&data).unwrap().count(), 0);

    // What a crash left in the trash is removed at the next start, and a symlink
    // there is removed, never followed out of the root.
    d.kill9();
    let outside = d.path("outside");
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("keep"), b"not the driver's").unwrap();
    let left = d.root.join("trash").join("vol-left.1-0");
    fs::create_dir_all(left.join("sub")).unwrap();
    fs::write(left.join("sub/f"), b"x").unwrap();
    std::os::unix::fs::symlink(&outside, left.join("link")).unwrap();
    std::os::unix::fs::symlink(&outside, d.root.join("trash").join("vol-link.2-0")).unwrap();
    let status = status_of(&d.root);
    assert!(
        status.contains("trash:        2 deleted, being removed"),
        "{status}"
    );
    d.spawn().await;
    trash_emptied(&d.root).await;
    assert_eq!(fs::read(outside.join("keep")).unwrap(), b"not the driver's");
    assert!(data.is_dir(), "the live volume is untouched");
}

/// A root written by an earlier localvol (one `<id>.json` file per record) is
/// taken over: its records move into the slot files, its volumes keep their data
/// and work, and a guard stops that earlier version from starting on it again.
#[tokio::test]
async fn records_of_an_earlier_version_are_moved_into_slots() {
    use localvol::store::{SnapshotRecord, Table, VolumeRecord, SLOT_FILE, TOO_OLD_GUARD};
    let mut d = Driver::start().await;
    let mut c = d.clients().await;
    let v = c.create("pvc-upgrade", MIB, &[], rwo()).await;
    let s = c.snapshot("snap-upgrade", &v.volume_id).await.unwrap();
    let staging = d.path("staging");
    fs::create_dir_all(&staging).unwrap();
    c.stage(&v.volume_id, &staging, rwo()).await.unwrap();
    fs::write(staging.join("data"), b"kept across the upgrade").unwrap();
    c.unstage(&v.volume_id, &staging).await.unwrap();
    d.kill9();

    // Rewrite the root as the earlier version left it.
    fn to_files<T: localvol::store::Record>(dir: &std::path::Path) {
        let recs = Table::<T>::open_slots(dir.to_path_buf()).unwrap().all();
        fs::remove_file(dir.join(SLOT_FILE)).unwrap();
        fs::remove_dir(dir.join(TOO_OLD_GUARD)).unwrap();
        for r in recs {
            let path = dir.join(format!("{}.json", r.id()));
            fs::write(path, serde_json::to_vec_pretty(&r).unwrap()).unwrap();
        }
    }
    to_files::<VolumeRecord>(&d.root.join("state/volumes"));
    to_files::<SnapshotRecord>(&d.root.join("state/snapshots"));
    assert_eq!(
        records(&d.root, "volumes"),
        [format!("{}.json", v.volume_id)]
    );

    d.envs.clear();
    d.spawn().await;
    let mut c = d.clients().await;
    assert_eq!(records(&d.root, "volumes"), vec![v.volume_id.clone()]);
    assert_eq!(records(&d.root, "snapshots"), vec![s.snapshot_id.clone()]);
    // What an earlier version does first at start-up, reading each `*.json`, fails.
    let guard = d.root.join("state/volumes").join(TOO_OLD_GUARD);
    assert!(
        fs::read(&guard).is_err(),
        "{guard:?} must not read as a record"
    );
    // The same volume, by the same name, with its data.
    assert_eq!(
        c.create("pvc-upgrade", MIB, &[], rwo()).await.volume_id,
        v.volume_id
    );
    c.stage(&v.volume_id, &staging, rwo()).await.unwrap();
    assert_eq!(
        fs::read(staging.join("data")).unwrap(),
        b"kept across the upgrade"
    );
    c.unstage(&v.volume_id, &staging).await.unwrap();
    c.delete_snapshot(&s.snapshot_id).await.unwrap();
    c.delete(&v.volume_id).await.unwrap();
    assert!(records(&d.root, "volumes").is_empty());
    assert!(records(&d.root, "snapshots").is_empty());
}

/// Two drivers on one root (a rolling update that starts the new pod first): the
/// second waits for the first to exit and then serves the same volumes; if the
/// first outlives the wait, the second refuses to start and names it.
#[tokio::test]
async fn a_second_driver_on_the_same_root_waits_for_the_first() {
    let mut first = Driver::start().await;
    let mut c = first.clients().await;
    let v = c.create("pvc-one-root", MIB, &[], rwo()).await;

    let other = tempfile::tempdir().unwrap();
    let sock = other.path().join("second.sock");
    let out = std::process::Command::new(binary())
        .args(["serve", "--node-id", NODE, "--root-lock-wait", "1"])
        .arg("--endpoint")
        .arg(format!("unix://{}", sock.display()))
        .arg("--root")
        .arg(&first.root)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the second driver started");
    assert!(
        err.contains(&format!("another localvol (pid {})", first.pid())),
        "{err}"
    );
    assert!(!sock.exists());
    // The first serves on, undisturbed.
    assert_eq!(
        c.create("pvc-one-root", MIB, &[], rwo()).await.volume_id,
        v.volume_id
    );

    let root = first.root.clone();
    let second = tokio::spawn(Driver::start_with(
        vec!["--root-lock-wait".into(), "30".into()],
        Some(root),
    ));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!second.is_finished(), "the second driver did not wait");
    first.kill9();
    let second = second.await.unwrap();
    let mut c = second.clients().await;
    assert_eq!(c.all_volumes().await.len(), 1);
    c.delete(&v.volume_id).await.unwrap();
    drop(second);
}

/// A record damaged on disk (its checksum fails) never costs its volume's data:
/// the data is not taken for a leftover, `status` names the damage, and the
/// volume is not served until the record is repaired. When even the id is
/// illegible, no data without a record is removed at all.
#[tokio::test]
async fn a_damaged_record_never_costs_its_data() {
    let mut d = Driver::start().await;
    let mut c = d.clients().await;
    let v = c.create("pvc-damaged", MIB, &[], rwo()).await;
    let data = d.root.join("volumes").join(&v.volume_id);
    fs::write(data.join("precious"), b"keep me").unwrap();
    d.kill9();

    let slots = d.root.join("state/volumes/slots");
    let id_at = |bytes: &[u8]| {
        bytes
            .windows(v.volume_id.len())
            .position(|w| w == v.volume_id.as_bytes())
            .unwrap()
    };
    let mut bytes = fs::read(&slots).unwrap();
    let at = id_at(&bytes) + v.volume_id.len() + 12;
    bytes[at] ^= 0x01;
    fs::write(&slots, &bytes).unwrap();
    d.spawn().await;
    let mut c = d.clients().await;
    assert_eq!(fs::read(data.join("precious")).unwrap(), b"keep me");
    assert!(c.all_volumes().await.is_empty());
    let status = status_of(&d.root);
    assert!(
        status.contains(&format!("record {} in slot 0", v.volume_id))
            && status.contains("is damaged"),
        "{status}"
    );

    // Now the id too, beside the data of a create that a crash interrupted.
    d.kill9();
    let mut bytes = fs::read(&slots).unwrap();
    let at = id_at(&bytes) + 6;
    bytes[at] = 0;
    fs::write(&slots, &bytes).unwrap();
    let orphan = localvol::ids::id_for_name(localvol::ids::Kind::Volume, "interrupted");
    fs::create_dir_all(d.root.join("volumes").join(&orphan)).unwrap();
    d.spawn().await;
    assert_eq!(fs::read(data.join("precious")).unwrap(), b"keep me");
    assert!(d.root.join("volumes").join(&orphan).exists());
    assert!(d.log().contains("illegible"), "{}", d.log());
}

/// A bind of a directory volume's subdirectory (what the kubelet makes for a
/// pod's subPath) still mounted after the volume was unpublished and unstaged
/// keeps DeleteVolume from removing the data it shows.
#[tokio::test]
async fn delete_waits_for_a_mounted_subdirectory() {
    if !need_root() {
        return;
    }
    let d = Driver::start().await;
    let mut c = d.clients().await;
    let id = c.create("subpath", 16 * MIB, &[], rwo()).await.volume_id;
    let (staging, target) = (d.path("staging"), d.path("target"));
    c.stage(&id, &staging, rwo()).await.unwrap();
    c.publish(&id, &staging, &target, rwo(), false)
        .await
        .unwrap();
    std::fs::create_dir(target.join("sub")).unwrap();
    std::fs::write(target.join("sub/data"), b"still used").unwrap();
    let sub = d.path("subpath-bind");
    std::fs::create_dir(&sub).unwrap();
    nix::mount::mount(
        Some(&target.join("sub")),
        &sub,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    c.unpublish(&id, &target).await.unwrap();
    c.unstage(&id, &staging).await.unwrap();
    let s = c.delete(&id).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s:?}");
    assert!(s.message().contains("subpath-bind"), "{}", s.message());
    assert_eq!(std::fs::read(sub.join("data")).unwrap(), b"still used");
    nix::mount::umount2(&sub, nix::mount::MntFlags::empty()).unwrap();
    c.delete(&id).await.unwrap();
}
