//! Loop-device volumes for real: attach by ioctl, mkfs once, mount, bind, block
//! devices, restart, expansion while mounted, and nothing left attached.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;

use common::*;
use localvol::proto::volume_capability::access_mode::Mode;
use localvol::proto::{CapacityRange, NodeExpandVolumeRequest};
use tonic::Code;

const MIB_U: u64 = 1 << 20;

fn has_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    const CAP_SYS_RESOURCE: u32 = 24;
    eff & (1 << CAP_SYS_RESOURCE) != 0
}

/// create, stage (mkfs), publish, write, unpublish/unstage (detached), restage
/// (never reformatted), SIGKILL + restart, expand while mounted, delete.
async fn filesystem_story(fs: &str) {
    if !need_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut d = Driver::start().await;
    let mut c = d.clients().await;
    let cap = mount_cap_fs(Mode::SingleNodeWriter, fs, &[]);
    // xfs needs 300 MiB at least; the file is sparse, so this costs nothing.
    let size = 320 * MIB;
    let v = c
        .create(
            "data",
            size,
            &[("type", "loop"), ("fsType", fs)],
            cap.clone(),
        )
        .await;
    assert_eq!(v.capacity_bytes, size);
    let id = v.volume_id.clone();
    let img = d.root.join("volumes").join(format!("{id}.img"));
    assert_eq!(std::fs::metadata(&img).unwrap().len(), size as u64);

    let staging = d.path("staging");
    let target = d.path("target");
    c.stage(&id, &staging, cap.clone()).await.unwrap();
    c.stage(&id, &staging, cap.clone()).await.unwrap(); // idempotent
    assert!(is_mounted(&staging));
    assert_eq!(loops_below(&d.root).len(), 1, "one device for one volume");
    let dev = &loops_below(&d.root)[0];
    let dio = std::fs::read_to_string(format!("/sys/block/{dev}/loop/dio")).unwrap();
    eprintln!("{dev}: direct I/O = {}", dio.trim());
    let ext4_root = nix::sys::statfs::statfs(&d.root).unwrap().filesystem_type()
        == nix::sys::statfs::EXT4_SUPER_MAGIC;
    if ext4_root {
        assert_eq!(dio.trim(), "1", "direct I/O on an ext4 root");
    }
    c.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    std::fs::write(target.join("hello"), b"written before restage").unwrap();
    let total = fs_total_bytes(&target);
    // xfs keeps its log out of the total; ext4 its metadata.
    assert!(
        total <= size as u64 && total > size as u64 * 7 / 10,
        "df shows the volume's size: {total}"
    );

    // Deleting data under a running pod is refused.
    assert_code(c.delete(&id).await, Code::FailedPrecondition);

    c.unpublish(&id, &target).await.unwrap();
    c.unstage(&id, &staging).await.unwrap();
    c.unstage(&id, &staging).await.unwrap(); // idempotent
    assert!(!is_mounted(&staging));
    assert!(
        loops_below(&d.root).is_empty(),
        "unstage detaches the device"
    );

    // Restage: the filesystem is found, not made again.
    c.stage(&id, &staging, cap.clone()).await.unwrap();
    c.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(target.join("hello")).unwrap(),
        b"written before restage"
    );

    // A crash of the driver changes nothing for the pod, and calls go on.
    d.restart_after_kill9().await;
    let mut c = d.clients().await;
    c.stage(&id, &staging, cap.clone()).await.unwrap();
    c.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    assert_eq!(loops_below(&d.root).len(), 1, "the attachment is reused");

    // Online expansion: controller grows the file, node grows the filesystem.
    let bigger = 640 * MIB;
    let r = c.expand(&id, bigger, Some(cap.clone())).await.unwrap();
    assert_eq!(r.capacity_bytes, bigger);
    assert!(r.node_expansion_required);
    match c.node_expand(&id, &target, bigger, Some(cap.clone())).await {
        Ok(n) => assert_eq!(n.capacity_bytes, bigger),
        // Online ext4 growth needs CAP_SYS_RESOURCE, which some sandboxes (this
        // project's build machines) withhold even from root; the driver says so and
        // grows the filesystem offline at the next stage.
        Err(s) if fs == "ext4" && !has_cap_sys_resource() => {
            assert_eq!(s.code(), Code::FailedPrecondition, "{}", s.message());
            assert!(s.message().contains("CAP_SYS_RESOURCE"), "{}", s.message());
            eprintln!("note: no CAP_SYS_RESOURCE here; checking the offline growth at restage");
            c.unpublish(&id, &target).await.unwrap();
            c.unstage(&id, &staging).await.unwrap();
            c.stage(&id, &staging, cap.clone()).await.unwrap();
            c.publish(&id, &staging, &target, cap.clone(), false)
                .await
                .unwrap();
        }
        Err(s) => panic!("NodeExpandVolume: {s:?}"),
    }
    let grown = fs_total_bytes(&target);
    assert!(
        grown > total + 200 * MIB_U,
        "df grew from {total} to {grown}"
    );
    assert_eq!(
        std::fs::read(target.join("hello")).unwrap(),
        b"written before restage"
    );
    // Expanding to the current size is a no-op; shrinking is OUT_OF_RANGE.
    assert_eq!(
        c.expand(&id, size, None).await.unwrap().capacity_bytes,
        bigger
    );
    let shrink = c
        .controller
        .controller_expand_volume(localvol::proto::ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(localvol::proto::CapacityRange {
                required_bytes: size,
                limit_bytes: size,
            }),
            ..Default::default()
        })
        .await;
    assert_code(shrink, Code::OutOfRange);

    let stats = c.stats(&id, &target).await;
    assert_eq!(stats.usage.len(), 2);
    assert!(stats.usage[0].total as u64 > total);
    assert!(!stats.volume_condition.unwrap().abnormal);

    c.unpublish(&id, &target).await.unwrap();
    c.unstage(&id, &staging).await.unwrap();
    c.delete(&id).await.unwrap();
    assert!(!img.exists());
    assert!(loops_below(&d.root).is_empty());
}

#[tokio::test]
async fn ext4_volume_story() {
    filesystem_story("ext4").await;
}

#[tokio::test]
async fn xfs_volume_story() {
    filesystem_story("xfs").await;
}

#[tokio::test]
async fn block_volume_is_a_raw_device_that_keeps_its_data() {
    if !need_root() {
        return;
    }
    let mut d = Driver::start().await;
    let mut c = d.clients().await;
    let cap = block_cap(Mode::SingleNodeWriter);
    let v = c
        .create("raw", 64 * MIB, &[("type", "loop")], cap.clone())
        .await;
    let id = v.volume_id;
    let staging = d.path("staging");
    let target = d.path("dev");
    c.stage(&id, &staging, cap.clone()).await.unwrap();
    c.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    c.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap(); // idempotent
    assert!(is_mounted(&target));
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_SYNC)
            .open(&target)
            .unwrap();
        f.seek(SeekFrom::Start(10 * MIB_U)).unwrap();
        f.write_all(&pattern).unwrap();
    }
    // A mount capability on a block volume is refused, and nothing formats it.
    assert_code(
        c.stage(&id, &d.path("other"), mount_cap(Mode::SingleNodeWriter))
            .await,
        Code::FailedPrecondition,
    );

    d.restart_after_kill9().await;
    let mut c = d.clients().await;
    c.unpublish(&id, &target).await.unwrap();
    assert!(!target.exists());
    c.unstage(&id, &staging).await.unwrap();
    assert!(loops_below(&d.root).is_empty());
    c.stage(&id, &staging, cap.clone()).await.unwrap();
    c.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    let mut back = vec![0u8; 4096];
    {
        let mut f = std::fs::File::open(&target).unwrap();
        f.seek(SeekFrom::Start(10 * MIB_U)).unwrap();
        f.read_exact(&mut back).unwrap();
    }
    assert_eq!(back, pattern, "block data survives unstage and restart");

    // Expansion of a block volume: the device grows, no node step is needed.
    let r = c.expand(&id, 128 * MIB, Some(cap.clone())).await.unwrap();
    assert!(!r.node_expansion_required);
    let stats = c.stats(&id, &target).await;
    assert_eq!(stats.usage.len(), 1);
    assert_eq!(stats.usage[0].total, 128 * MIB);
    // A CO may still call NodeExpandVolume, with or without the (optional)
    // capability: the device is what grew, and nothing is taken for a filesystem.
    for cap in [None, Some(cap.clone())] {
        let r = c.node_expand(&id, &target, 128 * MIB, cap).await.unwrap();
        assert_eq!(r.capacity_bytes, 128 * MIB);
    }

    c.unpublish(&id, &target).await.unwrap();
    c.unstage(&id, &staging).await.unwrap();
    c.delete(&id).await.unwrap();
    assert!(loops_below(&d.root).is_empty());
}

/// A volume made for both block and filesystem access: what a pod wrote through
/// its device is data even without a signature this driver knows (here an LVM
/// label), and a later filesystem stage refuses to format over it.
#[tokio::test]
async fn raw_data_without_a_known_signature_is_never_formatted() {
    if !need_root() {
        return;
    }
    let d = Driver::start().await;
    let mut c = d.clients().await;
    let block = block_cap(Mode::SingleNodeWriter);
    let fs = mount_cap_fs(Mode::SingleNodeWriter, "ext4", &[]);
    let mut req = create_req("both", 64 * MIB, &[("type", "loop")], block.clone());
    req.volume_capabilities.push(fs.clone());
    let id = c.create_as(req).await.volume_id;
    let (staging, target, fs_staging) = (d.path("staging"), d.path("dev"), d.path("fs"));

    // First a filesystem stage: formatted, used, unstaged.
    c.stage(&id, &fs_staging, fs.clone()).await.unwrap();
    std::fs::write(fs_staging.join("f"), b"fs").unwrap();
    c.unstage(&id, &fs_staging).await.unwrap();

    // Then raw use overwrites the start of the device.
    let mut label = vec![0u8; 64 * 1024];
    label[512..520].copy_from_slice(b"LABELONE");
    label[1024..1028].copy_from_slice(b"data");
    write_raw_then_stage_a_filesystem(&mut c, &d, &id, 0, &label).await;

    // The data is as the pod left it.
    c.stage(&id, &staging, block.clone()).await.unwrap();
    c.publish(&id, &staging, &target, block.clone(), false)
        .await
        .unwrap();
    let mut back = vec![0u8; 64 * 1024];
    std::fs::File::open(&target)
        .unwrap()
        .read_exact(&mut back)
        .unwrap();
    assert!(back == label, "the raw data is untouched");
    c.unpublish(&id, &target).await.unwrap();
    c.unstage(&id, &staging).await.unwrap();
    c.delete(&id).await.unwrap();
}

#[tokio::test]
async fn preallocated_volume_without_room_leaves_nothing() {
    if !need_root() {
        return;
    }
    // A small root of its own: filling the machine's disk would hurt everyone else.
    let img = ImageFs::new("ext4", 64 << 20, &["-q"], "").expect("mount ext4 image");
    let d = Driver::start_with(vec![], Some(img.mnt.join("root"))).await;
    let mut c = d.clients().await;
    // Fill most of it, so that the next volume fits the filesystem but not its room.
    let first = c
        .create(
            "first",
            24 * MIB,
            &[("type", "loop"), ("allocation", "preallocate")],
            rwo(),
        )
        .await;
    let free = nix::sys::statvfs::statvfs(&d.root).unwrap();
    let free = free.blocks_available() as u64 * free.fragment_size() as u64;
    let too_big = (free + 4 * MIB_U).div_ceil(MIB_U) * MIB_U;
    let r = c
        .controller
        .create_volume(create_req(
            "huge",
            too_big as i64,
            &[("type", "loop"), ("allocation", "preallocate")],
            rwo(),
        ))
        .await;
    assert_code(r, Code::ResourceExhausted);
    let left: Vec<_> = std::fs::read_dir(d.root.join("volumes"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left.len(),
        1,
        "nothing left behind but the first volume: {left:?}"
    );
    c.delete(&first.volume_id).await.unwrap();
    // The deleted volume's room is there for the next create at once, even while
    // its data may still be in the trash.
    let huge = c
        .create(
            "huge",
            too_big as i64,
            &[("type", "loop"), ("allocation", "preallocate")],
            rwo(),
        )
        .await;
    c.delete(&huge.volume_id).await.unwrap();
    // More than the whole filesystem can ever hold: OUT_OF_RANGE.
    let r = c
        .controller
        .create_volume(create_req(
            "impossible",
            1 << 30,
            &[("type", "loop"), ("allocation", "preallocate")],
            rwo(),
        ))
        .await;
    assert_code(r, Code::OutOfRange);

    // A preallocated volume that fits is fully allocated.
    let v = c
        .create(
            "small",
            8 * MIB,
            &[("type", "loop"), ("allocation", "preallocate")],
            rwo(),
        )
        .await;
    let img = d.root.join("volumes").join(format!("{}.img", v.volume_id));
    use std::os::unix::fs::MetadataExt;
    assert!(std::fs::metadata(img).unwrap().blocks() * 512 >= 8 * MIB_U);
}

#[tokio::test]
async fn unknown_fs_type_is_invalid_argument() {
    let d = Driver::start().await;
    let mut c = d.clients().await;
    let r = c
        .controller
        .create_volume(create_req(
            "bad",
            MIB,
            &[("type", "loop")],
            mount_cap_fs(Mode::SingleNodeWriter, "vfat", &[]),
        ))
        .await;
    assert_code(r, Code::InvalidArgument);
}

/// With --node-expansion-only the controller offers no expansion (the cluster's one
/// external-resizer then only updates the PV) and NodeExpandVolume on the node that
/// holds the volume grows the backing file, the record and the filesystem.
#[tokio::test]
async fn node_only_expansion_grows_everything_on_the_node() {
    if !need_root() {
        return;
    }
    let d = Driver::start_with(vec!["--node-expansion-only".into()], None).await;
    let mut c = d.clients().await;
    let caps = c
        .controller
        .controller_get_capabilities(localvol::proto::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let expand = localvol::proto::controller_service_capability::rpc::Type::ExpandVolume as i32;
    assert!(!caps.iter().any(|c| matches!(
        &c.r#type,
        Some(localvol::proto::controller_service_capability::Type::Rpc(r)) if r.r#type == expand
    )));
    let cap = mount_cap_fs(Mode::SingleNodeWriter, "xfs", &[]);
    let v = c
        .create(
            "grow",
            320 * MIB,
            &[("type", "loop"), ("fsType", "xfs")],
            cap.clone(),
        )
        .await;
    let id = v.volume_id;
    let (staging, target) = (d.path("staging"), d.path("target"));
    c.stage(&id, &staging, cap.clone()).await.unwrap();
    c.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    std::fs::write(target.join("keep"), b"kept").unwrap();
    let before = fs_total_bytes(&target);
    let r = c
        .node_expand(&id, &target, 512 * MIB, Some(cap.clone()))
        .await
        .unwrap();
    assert_eq!(r.capacity_bytes, 512 * MIB);
    assert!(fs_total_bytes(&target) > before + 150 * MIB_U);
    assert_eq!(std::fs::read(target.join("keep")).unwrap(), b"kept");
    let got = c
        .controller
        .controller_get_volume(localvol::proto::ControllerGetVolumeRequest {
            volume_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.volume.unwrap().capacity_bytes, 512 * MIB);
    c.unpublish(&id, &target).await.unwrap();
    c.unstage(&id, &staging).await.unwrap();
    c.delete(&id).await.unwrap();
}

/// A device held exclusively (as by a mkfs still running from a call whose driver
/// was killed) is never probed or formatted beside it: the stage is ABORTED until
/// it is free, then goes on.
#[tokio::test]
async fn busy_device_is_not_formatted_beside_another_writer() {
    if !need_root() {
        return;
    }
    let d = Driver::start().await;
    let mut c = d.clients().await;
    let cap = mount_cap_fs(Mode::SingleNodeWriter, "ext4", &[]);
    let v = c
        .create(
            "busy",
            64 * MIB,
            &[("type", "loop"), ("fsType", "ext4")],
            cap.clone(),
        )
        .await;
    let img = d.root.join("volumes").join(format!("{}.img", v.volume_id));
    let dev = localvol::loopdev::attach(&img).unwrap();
    let holder = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(dev.path())
        .unwrap();
    let staging = d.path("staging");
    assert_code(
        c.stage(&v.volume_id, &staging, cap.clone()).await,
        Code::Aborted,
    );
    drop(holder);
    c.stage(&v.volume_id, &staging, cap.clone()).await.unwrap();
    assert_eq!(loops_below(&d.root).len(), 1);
    c.unstage(&v.volume_id, &staging).await.unwrap();
    assert!(loops_below(&d.root).is_empty());
}

/// The kubelet sends a PV's mount options to NodeStageVolume and to
/// NodePublishVolume alike. A filesystem option (discard) is the filesystem's,
/// applied at stage; the publish bind takes the per-mount ones and succeeds.
#[tokio::test]
async fn filesystem_mount_options_reach_stage_and_do_not_stop_publish() {
    if !need_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let d = Driver::start().await;
    let mut c = d.clients().await;
    let cap = mount_cap_fs(Mode::SingleNodeMultiWriter, "ext4", &["discard", "noexec"]);
    let v = c
        .create("opts", 32 * MIB, &[("type", "loop")], cap.clone())
        .await;
    let id = v.volume_id.clone();
    let (staging, target) = (d.path("staging"), d.path("target"));
    c.stage(&id, &staging, cap.clone()).await.unwrap();
    c.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    c.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap(); // the same request again: OK
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line_of = |p: &std::path::Path| {
        info.lines()
            .find(|l| l.split(' ').nth(4) == Some(p.to_str().unwrap()))
            .unwrap_or_else(|| panic!("{} not mounted", p.display()))
            .to_string()
    };
    let staged = line_of(&staging);
    assert!(staged.contains("discard"), "{staged}");
    let published = line_of(&target);
    assert!(published.contains("noexec"), "{published}");
    std::fs::write(target.join("f"), b"x").unwrap();

    // Another per-mount option at the same target, or at the same staging path,
    // is a different request: ALREADY_EXISTS, and the mounts stay as they are.
    let other = mount_cap_fs(Mode::SingleNodeMultiWriter, "ext4", &["discard", "exec"]);
    assert_code(
        c.publish(&id, &staging, &target, other.clone(), false)
            .await,
        Code::AlreadyExists,
    );
    assert_code(c.stage(&id, &staging, other).await, Code::AlreadyExists);
    assert_eq!(line_of(&target), published);

    c.unpublish(&id, &target).await.unwrap();
    c.unstage(&id, &staging).await.unwrap();
    assert!(loops_below(&d.root).is_empty());
    c.delete(&id).await.unwrap();
}

/// NodeUnstageVolume at a path where the volume is not staged answers OK and
/// leaves the real stage alone (the spec: "MUST reply 0 OK").
#[tokio::test]
async fn unstage_at_another_path_is_ok_and_changes_nothing() {
    if !need_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let d = Driver::start().await;
    let mut c = d.clients().await;
    let cap = mount_cap_fs(Mode::SingleNodeMultiWriter, "ext4", &[]);
    let v = c
        .create("two-paths", 32 * MIB, &[("type", "loop")], cap.clone())
        .await;
    let id = v.volume_id.clone();
    let (staging, target) = (d.path("staging"), d.path("target"));
    c.stage(&id, &staging, cap.clone()).await.unwrap();
    c.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    let elsewhere = d.path("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    c.unstage(&id, &elsewhere).await.unwrap();
    c.unstage(&id, &d.path("never-made")).await.unwrap();
    assert!(is_mounted(&staging) && is_mounted(&target));
    assert_eq!(loops_below(&d.root).len(), 1, "the device stays attached");
    std::fs::write(target.join("f"), b"still here").unwrap();

    // NodeUnpublishVolume of another volume at this target says so, and leaves it.
    let other = c.create("other", MIB, &[], rwo()).await;
    assert_code(
        c.unpublish(&other.volume_id, &target).await,
        Code::FailedPrecondition,
    );
    assert!(is_mounted(&target));

    c.unpublish(&id, &target).await.unwrap();
    c.unstage(&id, &staging).await.unwrap();
    assert!(loops_below(&d.root).is_empty());
}

/// A block stage mounts nothing at its staging path, so the driver keeps that
/// path: an unstage at any other path finds the volume not staged there (OK,
/// nothing undone, the device stays), and so does a publish naming it.
#[tokio::test]
async fn block_unstage_at_another_path_is_ok_and_changes_nothing() {
    if !need_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let d = Driver::start().await;
    let mut c = d.clients().await;
    let cap = block_cap(Mode::SingleNodeWriter);
    let v = c
        .create(
            "block-two-paths",
            16 * MIB,
            &[("type", "loop")],
            cap.clone(),
        )
        .await;
    let id = v.volume_id.clone();
    let (staging, target) = (d.path("staging"), d.path("target"));
    let elsewhere = d.path("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    c.stage(&id, &staging, cap.clone()).await.unwrap();
    c.stage(&id, &staging, cap.clone()).await.unwrap();

    c.unstage(&id, &elsewhere).await.unwrap();
    c.unstage(&id, &d.path("never-made")).await.unwrap();
    assert_eq!(loops_below(&d.root).len(), 1, "the device stays attached");
    assert_code(
        c.publish(&id, &elsewhere, &target, cap.clone(), false)
            .await,
        Code::FailedPrecondition,
    );
    assert_code(
        c.node_expand(&id, &elsewhere, 16 * MIB, Some(cap.clone()))
            .await,
        Code::NotFound,
    );
    c.node_expand(&id, &staging, 16 * MIB, Some(cap.clone()))
        .await
        .unwrap();
    // The capability is optional there; the kept path says what it is.
    c.node_expand(&id, &staging, 16 * MIB, None).await.unwrap();
    c.publish(&id, &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    c.unpublish(&id, &target).await.unwrap();
    c.unstage(&id, &elsewhere).await.unwrap();
    assert_eq!(
        loops_below(&d.root).len(),
        1,
        "still staged at its own path"
    );

    c.unstage(&id, &staging).await.unwrap();
    assert!(loops_below(&d.root).is_empty());
    c.unstage(&id, &staging).await.unwrap();
    // Staged again at another path after the unstage: that path is its own now.
    c.stage(&id, &elsewhere, cap.clone()).await.unwrap();
    c.unstage(&id, &staging).await.unwrap();
    assert_eq!(loops_below(&d.root).len(), 1);
    c.unstage(&id, &elsewhere).await.unwrap();
    assert!(loops_below(&d.root).is_empty());
}

/// One staging path per loop volume: staged for block access at one path, it
/// is not staged at another, for a filesystem or for block access, nor staged
/// for block access beside its mounted filesystem, nor published raw under it.
/// A block path kept from before its device went away (a reboot) is replaced.
#[tokio::test]
async fn a_loop_volume_is_staged_at_one_path_at_a_time() {
    if !need_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let d = Driver::start().await;
    let mut c = d.clients().await;
    let block = block_cap(Mode::SingleNodeWriter);
    let fs = mount_cap_fs(Mode::SingleNodeWriter, "ext4", &[]);
    let mut req = create_req("both", 16 * MIB, &[("type", "loop")], block.clone());
    req.volume_capabilities.push(fs.clone());
    let id = c.create_as(req).await.volume_id;
    let (a, b) = (d.path("staging-a"), d.path("staging-b"));

    c.stage(&id, &a, block.clone()).await.unwrap();
    assert_code(c.stage(&id, &b, fs.clone()).await, Code::FailedPrecondition);
    assert_code(
        c.stage(&id, &b, block.clone()).await,
        Code::FailedPrecondition,
    );
    assert_eq!(loops_below(&d.root).len(), 1, "the block stage stays");
    c.unstage(&id, &a).await.unwrap();
    assert!(loops_below(&d.root).is_empty());

    c.stage(&id, &b, fs.clone()).await.unwrap();
    assert_code(
        c.stage(&id, &a, block.clone()).await,
        Code::FailedPrecondition,
    );
    let raw = d.path("raw-target");
    assert_code(
        c.publish(&id, &a, &raw, block.clone(), false).await,
        Code::FailedPrecondition,
    );
    c.unstage(&id, &b).await.unwrap();
    assert!(loops_below(&d.root).is_empty());

    // Staged for block access, then its device gone behind the driver's back
    // (as a reboot leaves it): a filesystem stage elsewhere replaces the kept
    // path, and its unstage detaches what it attached.
    c.stage(&id, &a, block.clone()).await.unwrap();
    for dev in loops_below(&d.root) {
        let out = std::process::Command::new("losetup")
            .args(["-d", &format!("/dev/{dev}")])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    c.stage(&id, &b, fs.clone()).await.unwrap();
    c.unstage(&id, &b).await.unwrap();
    assert!(loops_below(&d.root).is_empty());
}

/// mkfs.xfs formats nothing under 300 MiB: a smaller xfs claim is given 300 MiB
/// (the spec lets a volume exceed required_bytes), and its stage formats it; a
/// limit below that is OUT_OF_RANGE, where the volume used to be made and then
/// fail every stage.
#[tokio::test]
async fn a_small_xfs_claim_gets_what_mkfs_xfs_can_format() {
    if !need_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let d = Driver::start().await;
    let mut c = d.clients().await;
    let cap = mount_cap_fs(Mode::SingleNodeWriter, "xfs", &[]);
    let params = [("type", "loop"), ("fsType", "xfs")];
    let v = c.create("small-xfs", 64 * MIB, &params, cap.clone()).await;
    assert_eq!(v.capacity_bytes, 300 * MIB);
    let staging = d.path("staging");
    c.stage(&v.volume_id, &staging, cap.clone()).await.unwrap();
    assert!(is_mounted(&staging));
    c.unstage(&v.volume_id, &staging).await.unwrap();

    let mut limited = create_req("limited-xfs", 64 * MIB, &params, cap.clone());
    limited.capacity_range.as_mut().unwrap().limit_bytes = 100 * MIB;
    assert_code(c.controller.create_volume(limited).await, Code::OutOfRange);
    // Raw block access only: nothing is formatted, so nothing is added.
    let block = c
        .create(
            "small-raw",
            64 * MIB,
            &params,
            block_cap(Mode::SingleNodeWriter),
        )
        .await;
    assert_eq!(block.capacity_bytes, 64 * MIB);
}

/// mkfs.xfs writes its superblock first, marked in progress until it is done, and
/// refuses a device where it finds any xfs superblock: a stage killed while it ran
/// used to fail at every retry. The probe judges such a volume empty (nobody ever
/// used that filesystem), so the retry formats it.
#[tokio::test]
async fn a_stage_killed_during_mkfs_xfs_is_completed_by_its_retry() {
    if !need_root() {
        eprintln!("skipped: needs root");
        return;
    }
    use std::os::unix::fs::FileExt;
    let d = Driver::start().await;
    let mut c = d.clients().await;
    let cap = mount_cap_fs(Mode::SingleNodeWriter, "xfs", &[]);
    let params = [("type", "loop"), ("fsType", "xfs")];
    let v = c.create("half-made", 300 * MIB, &params, cap.clone()).await;
    // What the killed format leaves: the superblock, still marked in progress.
    let image = d.root.join("volumes").join(format!("{}.img", v.volume_id));
    let made = std::process::Command::new("mkfs.xfs")
        .args(["-q", "-K"])
        .arg(&image)
        .status()
        .unwrap();
    assert!(made.success());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image)
        .unwrap();
    file.write_all_at(&[1], 126).unwrap();
    let staging = d.path("staging");
    c.stage(&v.volume_id, &staging, cap.clone()).await.unwrap();
    assert!(is_mounted(&staging));
    c.unstage(&v.volume_id, &staging).await.unwrap();
    let mut in_progress = [0u8];
    file.read_exact_at(&mut in_progress, 126).unwrap();
    assert_eq!(in_progress[0], 0, "the format was not finished");
    c.delete(&v.volume_id).await.unwrap();
}

/// Two volumes staged at one path at the same moment: one is staged, the other
/// is ALREADY_EXISTS, as when they come one after the other. A loop stage takes
/// milliseconds between looking at the path and mounting there; both used to
/// succeed, one filesystem stacked over the other.
#[tokio::test]
async fn two_volumes_staged_at_one_path_at_once() {
    if !need_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let d = Driver::start().await;
    let (mut c1, mut c2) = (d.clients().await, d.clients().await);
    let cap = mount_cap_fs(Mode::SingleNodeWriter, "ext4", &[]);
    let params = [("type", "loop")];
    for round in 0..3 {
        let v1 = c1
            .create(&format!("one-{round}"), 16 * MIB, &params, cap.clone())
            .await;
        let v2 = c1
            .create(&format!("two-{round}"), 16 * MIB, &params, cap.clone())
            .await;
        let staging = d.path(&format!("staging-{round}"));
        let (r1, r2) = tokio::join!(
            c1.stage(&v1.volume_id, &staging, cap.clone()),
            c2.stage(&v2.volume_id, &staging, cap.clone()),
        );
        let codes = [&r1, &r2].map(|r| r.as_ref().err().map(|e| e.code()));
        assert!(
            codes.contains(&None) && codes.contains(&Some(Code::AlreadyExists)),
            "round {round}: {r1:?} {r2:?}"
        );
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.split(' ').nth(4) == Some(staging.to_str().unwrap()))
            .count();
        assert_eq!(mounts, 1, "round {round}");
        let staged = if r1.is_ok() { &v1 } else { &v2 };
        c1.unstage(&staged.volume_id, &staging).await.unwrap();
        for v in [&v1, &v2] {
            c1.delete(&v.volume_id).await.unwrap();
        }
    }
}

/// Sizes grow by whole MiB: one MiB more while unstaged reaches the filesystem
/// at the next stage (a MiB of slack used to hide it for good).
#[tokio::test]
async fn a_one_mib_growth_reaches_the_filesystem_at_the_next_stage() {
    if !need_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let d = Driver::start().await;
    let mut c = d.clients().await;
    let cap = mount_cap_fs(Mode::SingleNodeWriter, "ext4", &[]);
    let v = c
        .create("one-more", 64 * MIB, &[("type", "loop")], cap.clone())
        .await;
    let staging = d.path("staging");
    c.stage(&v.volume_id, &staging, cap.clone()).await.unwrap();
    let before = fs_total_bytes(&staging);
    c.unstage(&v.volume_id, &staging).await.unwrap();
    c.expand(&v.volume_id, 65 * MIB, Some(cap.clone()))
        .await
        .unwrap();
    c.stage(&v.volume_id, &staging, cap.clone()).await.unwrap();
    let after = fs_total_bytes(&staging);
    assert!(after > before, "{before} -> {after}");
    c.unstage(&v.volume_id, &staging).await.unwrap();
    let grown = |d: &Driver| d.log().matches("filesystem grown at stage").count();
    assert_eq!(grown(&d), 1);

    // resize2fs leaves off a new last block group too small for its metadata
    // (512 MiB + 1 MiB stays 512 MiB): tried once for that device size, not at
    // every stage after (an e2fsck of a large volume takes minutes).
    let w = c
        .create("tail", 512 * MIB, &[("type", "loop")], cap.clone())
        .await;
    c.stage(&w.volume_id, &staging, cap.clone()).await.unwrap();
    c.unstage(&w.volume_id, &staging).await.unwrap();
    c.expand(&w.volume_id, 513 * MIB, Some(cap.clone()))
        .await
        .unwrap();
    for _ in 0..2 {
        c.stage(&w.volume_id, &staging, cap.clone()).await.unwrap();
        c.unstage(&w.volume_id, &staging).await.unwrap();
    }
    assert_eq!(grown(&d), 2, "{}", d.log());
}

/// NodeExpandVolume at a read-only publish grows the filesystem through the
/// read-write staging mount under it, instead of answering OK with nothing grown.
#[tokio::test]
async fn node_expansion_at_a_read_only_publish_grows_the_filesystem() {
    if !need_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let d = Driver::start().await;
    let mut c = d.clients().await;
    // xfs: it grows online here (ext4's online growth needs CAP_SYS_RESOURCE).
    let cap = mount_cap_fs(Mode::SingleNodeWriter, "xfs", &[]);
    let v = c
        .create(
            "ro-grow",
            300 * MIB,
            &[("type", "loop"), ("fsType", "xfs")],
            cap.clone(),
        )
        .await;
    let (staging, target) = (d.path("staging"), d.path("target"));
    c.stage(&v.volume_id, &staging, cap.clone()).await.unwrap();
    c.publish(&v.volume_id, &staging, &target, cap.clone(), true)
        .await
        .unwrap();
    let before = fs_total_bytes(&target);
    c.expand(&v.volume_id, 400 * MIB, Some(cap.clone()))
        .await
        .unwrap();
    c.node_expand(&v.volume_id, &target, 400 * MIB, Some(cap.clone()))
        .await
        .unwrap();
    let after = fs_total_bytes(&target);
    assert!(after > before + 64 * MIB_U, "{before} -> {after}");
    c.unpublish(&v.volume_id, &target).await.unwrap();
    c.unstage(&v.volume_id, &staging).await.unwrap();
}

/// NodeExpandVolume keeps to capacity_range.limit_bytes, and grows nothing for
/// a path where the volume is not staged or published.
#[tokio::test]
async fn node_expansion_keeps_to_its_limit_and_its_path() {
    if !need_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let d = Driver::start_with(vec!["--node-expansion-only".into()], None).await;
    let mut c = d.clients().await;
    let cap = mount_cap_fs(Mode::SingleNodeMultiWriter, "ext4", &[]);
    let v = c
        .create("limits", 32 * MIB, &[("type", "loop")], cap.clone())
        .await;
    let id = v.volume_id.clone();
    let img = d.root.join("volumes").join(format!("{id}.img"));
    let size = || std::fs::metadata(&img).unwrap().len();
    let expand = |path: &std::path::Path, required: i64, limit: i64| NodeExpandVolumeRequest {
        volume_id: id.clone(),
        volume_path: path.display().to_string(),
        capacity_range: Some(CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    };
    let staging = d.path("staging");
    c.stage(&id, &staging, cap.clone()).await.unwrap();

    // Not at this path: NOT_FOUND, and the backing file is as it was.
    let elsewhere = d.path("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let r = c
        .node
        .node_expand_volume(expand(&elsewhere, 48 * MIB, 0))
        .await;
    assert_code(r, Code::NotFound);
    assert_eq!(size(), 32 * MIB_U);
    // Nor a regular file (as a raw publish target looks), with or without a
    // capability, nor a directory with a block capability.
    let file = d.path("a-file");
    std::fs::write(&file, b"not a volume").unwrap();
    let mut no_cap = expand(&file, 48 * MIB, 0);
    no_cap.volume_capability = None;
    assert_code(c.node.node_expand_volume(no_cap).await, Code::NotFound);
    let mut block = expand(&elsewhere, 48 * MIB, 0);
    block.volume_capability = Some(block_cap(Mode::SingleNodeWriter));
    assert_code(c.node.node_expand_volume(block).await, Code::NotFound);
    assert_eq!(size(), 32 * MIB_U);

    // More than the limit: refused, nothing grown.
    let r = c
        .node
        .node_expand_volume(expand(&staging, 64 * MIB, 48 * MIB))
        .await;
    assert!(
        matches!(
            r.as_ref().map_err(|s| s.code()),
            Err(Code::OutOfRange | Code::InvalidArgument)
        ),
        "{r:?}"
    );
    assert_eq!(size(), 32 * MIB_U);

    // Within it: grown to what was asked (the filesystem too where the sandbox
    // allows online resize).
    let r = c
        .node
        .node_expand_volume(expand(&staging, 48 * MIB, 64 * MIB))
        .await;
    match r {
        Ok(_) => {}
        Err(s) if !has_cap_sys_resource() && s.code() == Code::FailedPrecondition => {}
        Err(s) => panic!("{s:?}"),
    }
    assert_eq!(size(), 48 * MIB_U);
    c.unstage(&id, &staging).await.unwrap();
}

/// Data written through the raw device past a zeroed start (where a filesystem's
/// signature would be) is still data: a filesystem stage refuses to format over
/// it. The same volume never written is formatted.
#[tokio::test]
async fn raw_data_past_a_zeroed_start_is_never_formatted() {
    if !need_root() {
        return;
    }
    let d = Driver::start().await;
    let mut c = d.clients().await;
    let block = block_cap(Mode::SingleNodeWriter);
    let fs = mount_cap_fs(Mode::SingleNodeWriter, "ext4", &[]);
    let both = |name: &str| {
        let mut req = create_req(name, 32 * MIB, &[("type", "loop")], block.clone());
        req.volume_capabilities.push(fs.clone());
        req
    };
    let id = c.create_as(both("raw")).await.volume_id;
    let data = vec![0x5au8; 4096];
    write_raw_then_stage_a_filesystem(&mut c, &d, &id, 8 * MIB_U, &data).await;
    let img = d.root.join("volumes").join(format!("{id}.img"));
    let mut back = vec![0u8; 4096];
    let mut f = std::fs::File::open(&img).unwrap();
    f.seek(SeekFrom::Start(8 * MIB_U)).unwrap();
    f.read_exact(&mut back).unwrap();
    assert!(back == data, "the raw data is untouched");

    // Never written: formatted at its first filesystem stage.
    let fs_staging = d.path("fs");
    let fresh = c.create_as(both("fresh")).await.volume_id;
    c.stage(&fresh, &fs_staging, fs.clone()).await.unwrap();
    c.unstage(&fresh, &fs_staging).await.unwrap();
    for v in [&id, &fresh] {
        c.delete(v).await.unwrap();
    }
}

/// Writes `bytes` at `offset` through the volume's raw device (staged and
/// published for block access, then undone), and checks that a filesystem stage
/// then refuses to format over it and leaves nothing attached.
async fn write_raw_then_stage_a_filesystem(
    c: &mut Clients,
    d: &Driver,
    id: &str,
    offset: u64,
    bytes: &[u8],
) {
    let block = block_cap(Mode::SingleNodeWriter);
    let (staging, target) = (d.path("raw-staging"), d.path("raw-dev"));
    c.stage(id, &staging, block.clone()).await.unwrap();
    c.publish(id, &staging, &target, block, false)
        .await
        .unwrap();
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_SYNC)
            .open(&target)
            .unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        f.write_all(bytes).unwrap();
    }
    c.unpublish(id, &target).await.unwrap();
    c.unstage(id, &staging).await.unwrap();

    let fs = mount_cap_fs(Mode::SingleNodeWriter, "ext4", &[]);
    let s = c.stage(id, &d.path("fs"), fs).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert!(
        s.message().contains("refusing to format"),
        "{}",
        s.message()
    );
    assert!(
        loops_below(&d.root).is_empty(),
        "the refused stage detached"
    );
}
