//! Hostile input through the real binary: malformed ids, names, parameters and
//! paths on every RPC that takes them, symlinks planted at target and staging
//! paths, oversized messages and clients that hang up mid-call. A canary tree
//! outside the driver root stands in for /etc and must come out byte-identical
//! and unmounted.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use localvol::proto::volume_capability::access_mode::Mode;
use localvol::proto::*;
use prost::bytes::{Buf, BufMut};
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::{Code, Status};

// ----- the canary -----

/// A directory outside the driver root, with files, a subdirectory and a
/// symlink, whose every byte and inode attribute the test compares.
struct Canary {
    dir: tempfile::TempDir,
}

#[derive(Debug, PartialEq, Eq)]
struct Entry {
    mode: u32,
    ino: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    content: Vec<u8>,
}

impl Canary {
    fn plant() -> Canary {
        let dir = tempfile::Builder::new()
            .prefix("localvol-canary-")
            .tempdir_in("/tmp")
            .unwrap();
        let p = dir.path();
        std::fs::write(p.join("passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        std::fs::write(p.join("shadow"), "root:*:19000::::::\n").unwrap();
        std::fs::set_permissions(p.join("shadow"), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::create_dir(p.join("sub")).unwrap();
        std::fs::write(p.join("sub/hosts"), "127.0.0.1 localhost\n").unwrap();
        std::os::unix::fs::symlink("../passwd", p.join("sub/link")).unwrap();
        Canary { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Every entry below the canary (itself included) with its attributes.
    fn snapshot(&self) -> BTreeMap<PathBuf, Entry> {
        fn walk(p: &Path, out: &mut BTreeMap<PathBuf, Entry>) {
            let m = std::fs::symlink_metadata(p).unwrap();
            let content = if m.is_symlink() {
                std::fs::read_link(p)
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes()
            } else if m.is_file() {
                std::fs::read(p).unwrap()
            } else {
                vec![]
            };
            out.insert(
                p.to_path_buf(),
                Entry {
                    mode: m.mode(),
                    ino: m.ino(),
                    mtime: (m.mtime(), m.mtime_nsec()),
                    ctime: (m.ctime(), m.ctime_nsec()),
                    content,
                },
            );
            if m.is_dir() {
                for e in std::fs::read_dir(p).unwrap() {
                    walk(&e.unwrap().path(), out);
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(self.path(), &mut out);
        out
    }

    /// Mounts on or below the canary, as the kernel sees them.
    fn mounts(&self) -> Vec<PathBuf> {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        localvol::mount::parse_mountinfo(&text)
            .into_iter()
            .map(|m| m.mount_point)
            .filter(|p| p.starts_with(self.path()))
            .collect()
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        // Should a test fail with something mounted here, do not leave it behind.
        cleanup_below(self.path());
        let _ = nix::mount::umount2(self.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

// ----- counting answers -----

/// Counts the inputs tried and the codes they got, and checks each answer.
#[derive(Default)]
struct Tally {
    tried: usize,
    codes: BTreeMap<String, usize>,
}

impl Tally {
    #[track_caller]
    fn expect<T>(&mut self, what: &str, r: Result<T, Status>, allowed: &[Code]) {
        self.tried += 1;
        let code = match &r {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        };
        *self.codes.entry(format!("{code:?}")).or_default() += 1;
        let msg = r.err().map(|s| s.message().to_string()).unwrap_or_default();
        assert!(
            allowed.contains(&code),
            "{what}: got {code:?} ({}), expected one of {allowed:?}",
            cut(&msg, 300)
        );
    }
}

const BAD: &[Code] = &[Code::InvalidArgument, Code::NotFound];
/// For a well-formed request about the wrong thing (the volume is not staged at
/// that path, the target is a file, ...).
const REFUSED: &[Code] = &[
    Code::InvalidArgument,
    Code::NotFound,
    Code::FailedPrecondition,
    Code::AlreadyExists,
];

/// The first `n` characters, for messages.
fn cut(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

fn hex32() -> String {
    "0123456789abcdef".repeat(2)
}

/// Ids that must never name anything.
fn hostile_ids(canary: &Path) -> Vec<String> {
    let c = canary.display();
    vec![
        "..".into(),
        "../../../etc".into(),
        format!("vol-../../{c}"),
        format!("{c}"),
        format!("{c}/passwd"),
        "vol-".into(),
        format!("vol-{}", hex32().to_uppercase()),
        format!("vol-{}/", &hex32()[..31]),
        format!("vol-{}\0", &hex32()[..31]),
        format!("vol-{}\0/../x", hex32()),
        format!("vol-{}/../vol-{}", hex32(), hex32()),
        format!("vol-{}\n", hex32()),
        format!("snap-{}", hex32()),
        format!("vol-{}", "\u{ff10}".repeat(32)),
        "vol-\u{202e}txt.exe".into(),
        "\0".into(),
        "x".repeat(64 << 10),
        format!("vol-{}", "a".repeat(64 << 10)),
        // Well formed, names nothing: NOT_FOUND.
        format!("vol-{}", hex32()),
    ]
}

/// Caller paths that must be refused outright, whatever the volume.
fn hostile_paths(d: &Driver, canary: &Path) -> Vec<String> {
    let c = canary.display();
    let t = d.dir.path().display();
    vec![
        String::new(),
        "relative/target".into(),
        "../../..".into(),
        ".".into(),
        "/".into(),
        "//".into(),
        format!("{t}/../{}", canary.file_name().unwrap().to_string_lossy()),
        format!("{t}/./target"),
        format!("{t}/target/.."),
        format!("{c}/sub/.."),
        format!("{t}/tar\0get"),
        format!("{c}\0/x"),
        format!("{t}/{}", "x/".repeat(32 << 10)),
        format!("/{}", "y".repeat(64 << 10)),
    ]
}

/// Existing things outside the root, which a well-formed request may name but
/// must never get mounted over, emptied or removed.
fn outside_paths(canary: &Path) -> Vec<String> {
    let c = canary.display();
    vec![
        format!("{c}"),
        format!("{c}/sub"),
        format!("{c}/passwd"),
        format!("{c}/sub/link"),
        format!("/proc/self/root{c}"),
        format!("/proc/self/root{c}/sub"),
    ]
}

fn stage_req(id: &str, staging: &str, cap: VolumeCapability) -> NodeStageVolumeRequest {
    NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.into(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

fn publish_req(
    id: &str,
    staging: &str,
    target: &str,
    cap: VolumeCapability,
) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.into(),
        target_path: target.into(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

/// Every RPC that takes a volume id, with `id`.
async fn every_id_rpc(c: &mut Clients, t: &mut Tally, id: &str, staging: &str, target: &str) {
    let what = |rpc: &str| format!("{rpc}({:?})", cut(id, 60));
    let r = c.delete(id).await;
    // The spec: deleting what does not exist is done.
    t.expect(
        &what("DeleteVolume"),
        r,
        &[Code::Ok, Code::InvalidArgument, Code::NotFound],
    );
    let r = c
        .controller
        .controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: id.into(),
            node_id: NODE.into(),
            volume_capability: Some(rwo()),
            ..Default::default()
        })
        .await;
    t.expect(&what("ControllerPublishVolume"), r, BAD);
    let r = c
        .controller
        .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
            volume_id: id.into(),
            node_id: NODE.into(),
            ..Default::default()
        })
        .await;
    // Unpublishing what does not exist is done (the spec's idempotence).
    t.expect(
        &what("ControllerUnpublishVolume"),
        r,
        &[Code::Ok, Code::InvalidArgument, Code::NotFound],
    );
    let r = c
        .controller
        .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: id.into(),
            volume_capabilities: vec![rwo()],
            ..Default::default()
        })
        .await;
    t.expect(&what("ValidateVolumeCapabilities"), r, BAD);
    let r = c
        .controller
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: id.into(),
        })
        .await;
    t.expect(&what("ControllerGetVolume"), r, BAD);
    let r = c.expand(id, 2 * MIB, Some(rwo())).await;
    t.expect(&what("ControllerExpandVolume"), r, BAD);
    let r = c
        .node
        .node_stage_volume(stage_req(id, staging, rwo()))
        .await;
    t.expect(&what("NodeStageVolume"), r, BAD);
    let r = c.unstage(id, Path::new(staging)).await;
    t.expect(&what("NodeUnstageVolume"), r, BAD);
    let r = c
        .node
        .node_publish_volume(publish_req(id, staging, target, rwo()))
        .await;
    t.expect(&what("NodePublishVolume"), r, BAD);
    let r = c.unpublish(id, Path::new(target)).await;
    t.expect(&what("NodeUnpublishVolume"), r, BAD);
    let r = c
        .node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.into(),
            volume_path: staging.into(),
            ..Default::default()
        })
        .await;
    t.expect(&what("NodeGetVolumeStats"), r, BAD);
    let r = c.node_expand(id, Path::new(staging), 2 * MIB, None).await;
    t.expect(&what("NodeExpandVolume"), r, BAD);
}

/// Every node RPC that takes a path, with `path` there and `id` a real volume.
#[allow(clippy::too_many_arguments)]
async fn every_path_rpc(
    c: &mut Clients,
    t: &mut Tally,
    id: &str,
    path: &str,
    staging: &str,
    target: &str,
    allowed: &[Code],
    reads: &[Code],
) {
    let what = |rpc: &str| format!("{rpc}({id}, {:?})", cut(path, 80));
    let r = c.node.node_stage_volume(stage_req(id, path, rwo())).await;
    t.expect(&what("NodeStageVolume"), r, allowed);
    let r = c
        .node
        .node_publish_volume(publish_req(id, staging, path, rwo()))
        .await;
    t.expect(&what("NodePublishVolume target"), r, allowed);
    let r = c
        .node
        .node_publish_volume(publish_req(id, path, target, rwo()))
        .await;
    // The spec names FAILED_PRECONDITION for a missing staging path.
    let staging_codes: &[Code] = if path.is_empty() {
        &[Code::FailedPrecondition]
    } else {
        allowed
    };
    t.expect(&what("NodePublishVolume staging"), r, staging_codes);
    // Reads and idempotent undos of something not there may answer OK.
    let r = c
        .node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.into(),
            volume_path: path.into(),
            ..Default::default()
        })
        .await;
    t.expect(&what("NodeGetVolumeStats"), r, reads);
    let r = c.node_expand(id, Path::new(path), MIB, None).await;
    t.expect(&what("NodeExpandVolume"), r, reads);
    let r = c
        .node
        .node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: id.into(),
            target_path: path.into(),
        })
        .await;
    t.expect(&what("NodeUnpublishVolume"), r, reads);
    let r = c
        .node
        .node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: path.into(),
        })
        .await;
    t.expect(&what("NodeUnstageVolume"), r, reads);
}

// ----- a raw codec, to send bytes no generated client would -----

#[derive(Clone, Copy, Default)]
struct RawCodec;
struct RawEncoder;
struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut v = vec![0; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

/// Sends `msg` with `bad` (not UTF-8) appended at string field `tag`: the last
/// occurrence of a field wins, so the request carries the bad bytes there.
async fn raw_call(
    channel: tonic::transport::Channel,
    method: &'static str,
    msg: Vec<u8>,
    tag: u32,
    bad: &[u8],
) -> Result<Vec<u8>, Status> {
    let mut buf = msg;
    prost::encoding::bytes::encode(tag, &bad.to_vec(), &mut buf);
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(buf),
        PathAndQuery::from_static(method),
        RawCodec,
    )
    .await
    .map(|r| r.into_inner())
}

fn no_panic(d: &Driver) {
    let log = d.log();
    assert!(
        !log.contains("panicked"),
        "driver log shows a panic:\n{log}"
    );
}

#[tokio::test]
async fn hostile_inputs_touch_nothing_outside() {
    if !need_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let canary = Canary::plant();
    let before = canary.snapshot();
    let d = Driver::start().await;
    let mut c = d.clients().await;
    let mut t = Tally::default();

    // A real volume, staged, so that path checks run past "no such volume".
    let vol = c.create("real", 64 * MIB, &[], rwo()).await;
    let id = vol.volume_id.clone();
    let staging = d.path("staging");
    let target = d.path("target");
    c.stage(&id, &staging, rwo()).await.unwrap();
    let (staging_s, target_s) = (staging.display().to_string(), target.display().to_string());

    for bad in hostile_ids(canary.path()) {
        every_id_rpc(&mut c, &mut t, &bad, &staging_s, &target_s).await;
    }
    for p in hostile_paths(&d, canary.path()) {
        for vid in [id.as_str(), &format!("vol-{}", hex32())] {
            every_path_rpc(&mut c, &mut t, vid, &p, &staging_s, &target_s, BAD, BAD).await;
        }
    }
    for p in outside_paths(canary.path()) {
        let reads = &[
            Code::Ok,
            Code::InvalidArgument,
            Code::NotFound,
            Code::FailedPrecondition,
        ];
        every_path_rpc(
            &mut c, &mut t, &id, &p, &staging_s, &target_s, REFUSED, reads,
        )
        .await;
        every_path_rpc(
            &mut c,
            &mut t,
            &format!("vol-{}", hex32()),
            &p,
            &staging_s,
            &target_s,
            BAD,
            BAD,
        )
        .await;
    }

    // Names: anything printable is a fine name (it is hashed, never a path);
    // control characters and overlong names are not.
    let c_path = canary.path().display().to_string();
    let mut made = vec![];
    for (name, ok) in [
        (format!("../../{c_path}"), true),
        (c_path.clone(), true),
        ("/etc/passwd".to_string(), true),
        ("a/../../b".to_string(), true),
        (String::new(), false),
        ("a\0b".to_string(), false),
        ("\0".to_string(), false),
        ("a\u{1b}[2Jb".to_string(), false),
        ("x".repeat(64 << 10), false),
        ("x".repeat(1025), false),
    ] {
        let r = c
            .controller
            .create_volume(create_req(&name, MIB, &[], rwo()))
            .await;
        if let Ok(v) = &r {
            made.push(v.get_ref().volume.as_ref().unwrap().volume_id.clone());
        }
        t.expect(
            &format!("CreateVolume name {:?}", cut(&name, 60)),
            r,
            if ok { &[Code::Ok] } else { BAD },
        );
    }
    for v in made {
        c.delete(&v).await.unwrap();
    }

    // Parameters and capabilities.
    let long = "v".repeat(64 << 10);
    let params: Vec<Vec<(&str, &str)>> = vec![
        vec![("type", "../../loop")],
        vec![("type", "loop\0")],
        vec![("type", "loop"), ("fsType", "../../../sbin/mkfs.evil")],
        vec![("type", "loop"), ("fsType", c_path.as_str())],
        vec![("type", "loop"), ("fsType", "ext4\0")],
        vec![("type", "loop"), ("fsType", "ext4 -E root_owner")],
        vec![("../../x", "dir")],
        vec![("type\0", "dir")],
        vec![("", "")],
        vec![(long.as_str(), "dir")],
        vec![("type", long.as_str())],
        vec![("allocation", "preallocate"), ("type", "dir")],
        vec![("enforceSize", "1")],
        vec![("shared", "true")],
    ];
    for kv in &params {
        let r = c
            .controller
            .create_volume(create_req("params", MIB, kv, rwo()))
            .await;
        t.expect(
            &format!("CreateVolume parameters {}", cut(&format!("{kv:?}"), 100)),
            r,
            BAD,
        );
    }
    for (i, (bytes, limit)) in [
        (-1, 0),
        (0, -1),
        (2 * MIB, MIB),
        (i64::MIN, i64::MIN),
        (i64::MAX, 0),
    ]
    .into_iter()
    .enumerate()
    {
        let mut req = create_req(&format!("capacity-{i}"), bytes, &[], rwo());
        req.capacity_range.as_mut().unwrap().limit_bytes = limit;
        let r = c.controller.create_volume(req).await;
        // A directory volume's size is advisory unless enforced: i64::MAX is
        // accepted as a number, and costs nothing.
        let allowed: &[Code] = if bytes == i64::MAX {
            &[
                Code::Ok,
                Code::InvalidArgument,
                Code::OutOfRange,
                Code::ResourceExhausted,
            ]
        } else {
            &[Code::InvalidArgument, Code::OutOfRange]
        };
        if let Ok(v) = &r {
            c.delete(&v.get_ref().volume.as_ref().unwrap().volume_id.clone())
                .await
                .unwrap();
        }
        t.expect(
            &format!("CreateVolume capacity {bytes}/{limit}"),
            r,
            allowed,
        );
    }
    for r in [-1, i64::MIN] {
        let res = c.expand(&id, r, Some(rwo())).await;
        t.expect(
            &format!("ControllerExpandVolume {r}"),
            res,
            &[Code::InvalidArgument, Code::OutOfRange],
        );
    }
    // A negative size once "expanded" the record down to 1 MiB.
    let got = c
        .controller
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.volume.unwrap().capacity_bytes, 64 * MIB);
    let fl = "f".repeat(64 << 10);
    let flags: Vec<Vec<&str>> = vec![
        vec!["bind", c_path.as_str()],
        vec!["ro\0"],
        vec!["remount"],
        vec!["x-mount.mkdir"],
        vec!["upperdir=/tmp"],
        vec![fl.as_str()],
        vec!["aé".repeat(200).leak()],
    ];
    for f in &flags {
        let cap = mount_cap_fs(Mode::SingleNodeWriter, "", f);
        let r = c
            .node
            .node_publish_volume(publish_req(&id, &staging_s, &target_s, cap.clone()))
            .await;
        t.expect(
            &format!("NodePublishVolume flags {}", cut(&format!("{f:?}"), 100)),
            r,
            BAD,
        );
        let r = c
            .controller
            .create_volume(create_req("flags", MIB, &[("type", "loop")], cap))
            .await;
        // Filesystem options are checked at mount time, not here.
        t.expect(
            &format!("CreateVolume flags {}", cut(&format!("{f:?}"), 100)),
            r,
            &[Code::Ok, Code::InvalidArgument, Code::AlreadyExists],
        );
    }
    c.delete(&localvol::ids::id_for_name(
        localvol::ids::Kind::Volume,
        "flags",
    ))
    .await
    .unwrap();
    for fs in ["../../../bin/sh", "ext4\0", "btrfs", c_path.as_str()] {
        let cap = mount_cap_fs(Mode::SingleNodeWriter, fs, &[]);
        let r = c
            .controller
            .create_volume(create_req("fs", MIB, &[("type", "loop")], cap))
            .await;
        t.expect(&format!("CreateVolume capability fs {fs:?}"), r, BAD);
    }
    let r = c
        .controller
        .controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: id.clone(),
            node_id: format!("../../{c_path}"),
            volume_capability: Some(rwo()),
            ..Default::default()
        })
        .await;
    t.expect("ControllerPublishVolume node ../", r, BAD);
    let r = c
        .controller
        .controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: id.clone(),
            node_id: "node\0".into(),
            volume_capability: Some(rwo()),
            ..Default::default()
        })
        .await;
    t.expect("ControllerPublishVolume node NUL", r, BAD);

    // Not UTF-8 at all: prost refuses to decode it before any handler runs, and
    // the driver's codec answers INVALID_ARGUMENT naming the field.
    let channel = connect(&d.socket).await;
    let bad: &[u8] = b"vol-\xff\xfe/../\xc0\xaf";
    let path_bad: &[u8] = b"/tmp/\xff\xfe/../\xc0\xaf";
    let stage = stage_req(&id, &staging_s, rwo()).encode_to_vec();
    let publish = publish_req(&id, &staging_s, &target_s, rwo()).encode_to_vec();
    let raw: Vec<(&'static str, Vec<u8>, u32, &[u8])> = vec![
        (
            "/csi.v1.Controller/CreateVolume",
            create_req("x", MIB, &[], rwo()).encode_to_vec(),
            1,
            bad,
        ),
        ("/csi.v1.Controller/DeleteVolume", vec![], 1, bad),
        ("/csi.v1.Controller/ControllerGetVolume", vec![], 1, bad),
        (
            "/csi.v1.Controller/ControllerUnpublishVolume",
            vec![],
            1,
            bad,
        ),
        (
            "/csi.v1.Controller/ControllerUnpublishVolume",
            vec![],
            2,
            bad,
        ),
        ("/csi.v1.Node/NodeStageVolume", stage.clone(), 1, bad),
        ("/csi.v1.Node/NodeStageVolume", stage, 3, path_bad),
        (
            "/csi.v1.Node/NodePublishVolume",
            publish.clone(),
            3,
            path_bad,
        ),
        ("/csi.v1.Node/NodePublishVolume", publish, 4, path_bad),
        ("/csi.v1.Node/NodeUnpublishVolume", vec![], 2, path_bad),
        ("/csi.v1.Node/NodeUnstageVolume", vec![], 2, path_bad),
        ("/csi.v1.Node/NodeGetVolumeStats", vec![], 2, path_bad),
        ("/csi.v1.Node/NodeExpandVolume", vec![], 2, path_bad),
    ];
    for (method, msg, tag, b) in raw {
        let r = raw_call(channel.clone(), method, msg, tag, b).await;
        if let Err(e) = &r {
            assert!(e.message().contains("UTF-8"), "{method}: {}", e.message());
        }
        t.expect(
            &format!("{method} non-UTF-8 field {tag}"),
            r,
            &[Code::InvalidArgument],
        );
    }

    // The driver still serves, the real volume is still staged, the canary is
    // untouched and nothing is mounted on it.
    c.identity.probe(ProbeRequest {}).await.unwrap();
    assert!(
        is_mounted(&staging),
        "the real volume lost its staging mount"
    );
    assert_eq!(canary.mounts(), Vec::<PathBuf>::new());
    assert!(canary.snapshot() == before, "the canary changed");
    c.unstage(&id, &staging).await.unwrap();
    c.delete(&id).await.unwrap();
    no_panic(&d);
    println!("hostile inputs tried: {}; answers: {:?}", t.tried, t.codes);
}

/// A symlink at the target or staging path pointing at the canary: nothing is
/// mounted over the canary, nothing in it is removed, for dir and loop volumes.
#[tokio::test]
async fn symlinks_at_target_and_staging_paths() {
    if !need_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let canary = Canary::plant();
    let before = canary.snapshot();
    let d = Driver::start().await;
    let mut c = d.clients().await;
    let link = d.path("link");
    std::os::unix::fs::symlink(canary.path(), &link).unwrap();
    for (name, kv) in [("dir", vec![]), ("loop", vec![("type", "loop")])] {
        let id = c.create(name, 64 * MIB, &kv, rwo()).await.volume_id;
        let staging = d.path(&format!("staging-{name}"));

        // Staging onto the symlink.
        assert_code(c.stage(&id, &link, rwo()).await, Code::InvalidArgument);
        assert!(
            canary.mounts().is_empty(),
            "{name}: canary mounted by stage"
        );
        assert!(
            loops_below(&d.root).is_empty(),
            "{name}: a failed stage left a loop device attached"
        );
        c.unstage(&id, &link).await.unwrap();
        assert!(link.is_symlink() && canary.path().join("passwd").exists());

        // Publishing onto the symlink, with the volume properly staged.
        c.stage(&id, &staging, rwo()).await.unwrap();
        assert_code(
            c.publish(&id, &staging, &link, rwo(), false).await,
            Code::InvalidArgument,
        );
        assert!(
            canary.mounts().is_empty(),
            "{name}: canary mounted by publish"
        );
        // Unpublish leaves a symlink it did not make alone, and never follows it.
        let r = c.unpublish(&id, &link).await;
        assert!(
            r.as_ref().is_ok() || r.as_ref().unwrap_err().code() == Code::FailedPrecondition,
            "{r:?}"
        );
        assert!(link.is_symlink(), "{name}: unpublish removed the symlink");
        // The symlink at a path inside a legitimate target directory, too.
        let inner = d.path(&format!("pod-{name}"));
        std::fs::create_dir(&inner).unwrap();
        let inner_link = inner.join("mount");
        std::os::unix::fs::symlink(canary.path().join("sub"), &inner_link).unwrap();
        assert_code(
            c.publish(&id, &staging, &inner_link, rwo(), false).await,
            Code::InvalidArgument,
        );
        let _ = c.unpublish(&id, &inner_link).await;
        assert!(canary.mounts().is_empty());
        assert!(canary.snapshot() == before, "{name}: the canary changed");

        c.unstage(&id, &staging).await.unwrap();
        c.delete(&id).await.unwrap();
    }
    assert!(canary.snapshot() == before, "the canary changed");
    assert!(canary.mounts().is_empty());
    no_panic(&d);
}

/// A message over the server's 4 MiB limit is refused by tonic before the
/// driver sees it, and the driver keeps serving.
#[tokio::test]
async fn oversized_message_is_refused() {
    let d = Driver::start().await;
    let mut c = d.clients().await;
    let big = "p".repeat(5 << 20);
    let r = c
        .controller
        .create_volume(create_req(
            "big",
            MIB,
            &[("csi.storage.k8s.io/pvc/name", &big)],
            rwo(),
        ))
        .await;
    let code = r.as_ref().err().map(|s| s.code());
    println!("5 MiB CreateVolume answered {code:?}");
    // gRPC says RESOURCE_EXHAUSTED; tonic 0.14 answers OUT_OF_RANGE.
    assert!(
        matches!(
            code,
            Some(Code::ResourceExhausted | Code::OutOfRange | Code::InvalidArgument)
        ),
        "{r:?}"
    );
    c.identity.probe(ProbeRequest {}).await.unwrap();
    let mut c = d.clients().await;
    let v = c.create("small", MIB, &[], rwo()).await;
    c.delete(&v.volume_id).await.unwrap();
    assert!(records(&d.root, "volumes").is_empty());
    no_panic(&d);
}

/// A client that hangs up during a NodeStage that formats a loop volume: the
/// driver finishes or undoes the work, keeps serving, and a retried stage
/// succeeds; unstage leaves nothing attached or mounted.
#[tokio::test]
async fn client_disconnecting_mid_stage() {
    if !need_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let d = Driver::start().await;
    let mut c = d.clients().await;
    let id = c
        .create("mkfs", 256 * MIB, &[("type", "loop")], rwo())
        .await
        .volume_id;
    let staging = d.path("staging");
    let mut hung_up = 0;
    for round in 0..3 {
        // Hang up after a few ms, while mkfs runs (longer in later rounds).
        let mut gone = d.clients().await;
        let call = gone.stage(&id, &staging, rwo());
        let cut = Duration::from_millis(5 + 40 * round);
        if tokio::time::timeout(cut, call).await.is_err() {
            hung_up += 1;
        }
        drop(gone);
        c.identity.probe(ProbeRequest {}).await.unwrap();
        c.stage(&id, &staging, rwo()).await.unwrap();
        assert!(is_mounted(&staging));
        c.unstage(&id, &staging).await.unwrap();
        assert!(!is_mounted(&staging));
        assert!(
            loops_below(&d.root).is_empty(),
            "a loop device stays attached after unstage"
        );
    }
    println!("client hung up mid-stage in {hung_up} of 3 rounds");
    c.delete(&id).await.unwrap();
    no_panic(&d);
}

/// A loop stage that fails after attaching (here: a mount option ext4 refuses)
/// detaches the device again: the kubelet never unstages a failed stage.
#[tokio::test]
async fn failed_loop_stage_detaches() {
    if !need_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let d = Driver::start().await;
    let mut c = d.clients().await;
    let id = c
        .create("bad-option", 64 * MIB, &[("type", "loop")], rwo())
        .await
        .volume_id;
    let staging = d.path("staging");
    let attached = || loops_below(&d.root).len();
    let cap = mount_cap_fs(Mode::SingleNodeWriter, "ext4", &["no_such_option"]);
    assert_code(c.stage(&id, &staging, cap).await, Code::InvalidArgument);
    assert!(!is_mounted(&staging));
    assert_eq!(
        attached(),
        0,
        "the failed stage left its loop device attached"
    );
    // The volume is intact: a good stage works (and does not reformat).
    c.stage(&id, &staging, rwo()).await.unwrap();
    c.unstage(&id, &staging).await.unwrap();
    assert_eq!(attached(), 0);
    c.delete(&id).await.unwrap();
    no_panic(&d);
}

/// The directories the driver removes entries from (volumes/, snapshots/, trash/,
/// the record directories and state/ above them) replaced by symlinks to the canary: the driver refuses to start, and nothing
/// of the canary is removed, though it is full of names that look like leftovers.
/// Starts the driver on `root`; its stderr if it refused to start (exited with a
/// failure within 20 s), None if it started (then it is killed).
fn refused_start(root: &Path, socket: &Path) -> Option<String> {
    let mut child = std::process::Command::new(binary())
        .arg("serve")
        .arg("--endpoint")
        .arg(format!("unix://{}", socket.display()))
        .args(["--node-id", "n1", "--root"])
        .arg(root)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = child.try_wait().unwrap().is_none();
    if started {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    (!started && !out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn symlinked_root_directories_are_refused_at_start() {
    if !need_root() {
        return;
    }
    let canary = Canary::plant();
    // Entries start-up would take for leftovers (data without a record) if it
    // followed the link; in the trash, everything is taken.
    let orphan = localvol::ids::id_for_name(localvol::ids::Kind::Volume, "x");
    std::fs::create_dir_all(canary.path().join(&orphan)).unwrap();
    std::fs::write(canary.path().join(format!("{orphan}.img")), b"img").unwrap();
    std::fs::write(canary.path().join("x.json.tmp"), b"tmp").unwrap();
    let before = canary.snapshot();
    let tmp = tempfile::tempdir().unwrap();
    for sub in [
        "volumes",
        "snapshots",
        "trash",
        "state",
        "state/volumes",
        "state/snapshots",
    ] {
        let root = tmp.path().join(format!("root-{}", sub.replace('/', "-")));
        std::fs::create_dir_all(&root).unwrap();
        if sub != "state" {
            std::fs::create_dir_all(root.join("state")).unwrap();
        }
        std::os::unix::fs::symlink(canary.path(), root.join(sub)).unwrap();
        let err = refused_start(&root, &tmp.path().join("csi.sock"))
            .unwrap_or_else(|| panic!("{sub}: the driver started"));
        assert!(err.contains("is not a directory"), "{sub}: {err}");
        assert!(canary.snapshot() == before, "{sub}: the canary changed");
    }
}

/// The files the driver writes in place at its root (the slot files of its
/// records, its lock) are never followed when they are symlinks: the driver
/// refuses to start, and what they point at is untouched.
#[test]
fn symlinked_slot_files_and_lock_are_refused_at_start() {
    if !need_root() {
        return;
    }
    let canary = Canary::plant();
    let before = canary.snapshot();
    let tmp = tempfile::tempdir().unwrap();
    for file in [
        "state/volumes/slots",
        "state/snapshots/slots",
        "localvol.lock",
    ] {
        let root = tmp.path().join(format!("root-{}", file.replace('/', "-")));
        let link = root.join(file);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(canary.path().join("passwd"), &link).unwrap();
        let err = refused_start(&root, &tmp.path().join("csi.sock"))
            .unwrap_or_else(|| panic!("{file}: the driver started"));
        assert!(err.contains("symbolic links"), "{file}: {err}");
        assert!(canary.snapshot() == before, "{file}: the canary changed");
    }
}

/// Staging and target paths inside the driver's root are refused before
/// anything is done: an unpublish naming another volume's (empty) data
/// directory used to remove it, and a publish there mounted over it.
#[tokio::test]
async fn paths_inside_the_root_are_refused() {
    if !need_root() {
        return;
    }
    let d = Driver::start().await;
    let mut c = d.clients().await;
    let a = c.create("a", 16 * MIB, &[], rwo()).await.volume_id;
    let b = c.create("b", 16 * MIB, &[], rwo()).await.volume_id;
    let b_dir = d.root.join("volumes").join(&b);
    let staging = d.path("staging");
    c.stage(&a, &staging, rwo()).await.unwrap();
    for inside in [
        b_dir.clone(),
        d.root.clone(),
        d.root.join("volumes").join("new"),
    ] {
        assert_code(c.unpublish(&a, &inside).await, Code::InvalidArgument);
        assert_code(c.unstage(&a, &inside).await, Code::InvalidArgument);
        assert_code(
            c.publish(&a, &staging, &inside, rwo(), false).await,
            Code::InvalidArgument,
        );
        assert_code(c.stage(&b, &inside, rwo()).await, Code::InvalidArgument);
    }
    // Nor through a symlink among parents a stage would make.
    let link = d.path("link");
    std::os::unix::fs::symlink(d.root.join("volumes"), &link).unwrap();
    assert_code(
        c.stage(&b, &link.join("new-parent").join("stage"), rwo())
            .await,
        Code::InvalidArgument,
    );
    assert!(!d.root.join("volumes").join("new-parent").exists());
    assert!(b_dir.is_dir(), "b's data directory is still there");
    // Nor over a device node, a FIFO or a socket, whatever they are named.
    let lp = c
        .create(
            "raw",
            16 * MIB,
            &[("type", "loop")],
            block_cap(Mode::SingleNodeWriter),
        )
        .await
        .volume_id;
    let raw_staging = d.path("raw-staging");
    c.stage(&lp, &raw_staging, block_cap(Mode::SingleNodeWriter))
        .await
        .unwrap();
    let null = d.path("null");
    nix::sys::stat::mknod(
        &null,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    let fifo = d.path("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    for special in [&null, &fifo] {
        assert_code(
            c.publish(
                &lp,
                &raw_staging,
                special,
                block_cap(Mode::SingleNodeWriter),
                false,
            )
            .await,
            Code::InvalidArgument,
        );
        assert!(!is_mounted(special));
    }
    c.unstage(&lp, &raw_staging).await.unwrap();
    assert!(!d.root.join("volumes").join("new").exists());
    assert!(!is_mounted(&b_dir));
    c.unstage(&a, &staging).await.unwrap();
    let target = d.path("target");
    c.stage(&b, &staging, rwo()).await.unwrap();
    c.publish(&b, &staging, &target, rwo(), false)
        .await
        .unwrap();
    c.unpublish(&b, &target).await.unwrap();
    c.unstage(&b, &staging).await.unwrap();
}
