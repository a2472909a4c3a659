//! localvol: a CSI driver for node-local storage.
//!
//! Reading order: `server` (socket, shutdown) -> `csi::*` (the gRPC edge, one module
//! per CSI service) -> the domain, which knows nothing of gRPC: `volumes`
//! (controller side: create, delete, expand), `publish` (node side: stage,
//! publish, node expansion, stats), `snapshots` (snapshots, restores, clones),
//! `attach` (controller publish) -> the parts they are made of: `store` (records),
//! `backend` (where data lives: dir, loop files, btrfs, project quotas, copies),
//! `loopdev` (loop ioctls), `filesystem` (probe, mkfs, mount, grow, freeze),
//! `mount` (what is mounted where: statx/statmount per path, an index kept by the
//! kernel's mount reports for every mount of some data; bind mounts), `access`
//! (access-mode rules), `ids`, `params`. Around them: `codec` (undecodable
//! requests are INVALID_ARGUMENT), `beside` (a kept thread for a second flush),
//! `metrics`, `status` and `inspect` (what operators see), `faults` (crash points
//! for tests), `client` (a CSI connection over a unix socket, for the benchmark
//! and the tests).

pub mod access;
pub mod attach;
pub mod authority;
pub mod backend;
pub mod beside;
pub mod client;
pub mod codec;
pub mod csi;
pub mod error;
pub mod faults;
pub mod filesystem;
pub mod ids;
pub mod inspect;
pub mod locks;
pub mod loopdev;
pub mod metrics;
pub mod mount;
pub mod nodelock;
pub mod params;
pub mod programs;
pub mod promises;
pub mod publish;
pub mod rootlock;
pub mod server;
pub mod snapshots;
pub mod status;
pub mod store;
pub mod volumes;

/// The code generated from `proto/csi.proto` (package `csi.v1`).
pub mod proto {
    tonic::include_proto!("csi.v1");
}

/// The version reported by GetPluginInfo.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[cfg(test)]
mod proto_tests {
    //! `proto/csi.proto` must stay a complete CSI v1.12.0 definition even for the
    //! services localvol does not serve, so these pin what a partial file would lose.
    use super::proto;
    use prost::Message;
    use tonic::transport::Channel;

    /// Compiles only if the generated code has a client for every CSI service.
    #[test]
    fn every_service_has_a_client() {
        fn exists<T>() {}
        exists::<proto::identity_client::IdentityClient<Channel>>();
        exists::<proto::controller_client::ControllerClient<Channel>>();
        exists::<proto::node_client::NodeClient<Channel>>();
        exists::<proto::group_controller_client::GroupControllerClient<Channel>>();
        exists::<proto::snapshot_metadata_client::SnapshotMetadataClient<Channel>>();
    }

    #[test]
    fn enum_numbers_are_the_spec_numbers() {
        use proto::controller_service_capability::rpc::Type as Ctrl;
        use proto::node_service_capability::rpc::Type as Node;
        use proto::plugin_capability::service::Type as Plugin;
        use proto::volume_capability::access_mode::Mode;
        assert_eq!(Ctrl::ModifyVolume as i32, 14);
        assert_eq!(Ctrl::GetSnapshot as i32, 15);
        assert_eq!(Node::VolumeMountGroup as i32, 6);
        assert_eq!(Plugin::SnapshotMetadataService as i32, 4);
        assert_eq!(Mode::SingleNodeMultiWriter as i32, 7);
        assert_eq!(
            proto::group_controller_service_capability::rpc::Type::CreateDeleteGetVolumeGroupSnapshot
                as i32,
            1
        );
        assert_eq!(proto::BlockMetadataType::VariableLength as i32, 2);
    }

    /// Field numbers are what travels on the wire: encode and compare bytes.
    #[test]
    fn field_numbers_are_the_spec_numbers() {
        let delta = proto::GetMetadataDeltaRequest {
            base_snapshot_id: "a".into(),
            target_snapshot_id: "b".into(),
            starting_offset: 3,
            max_results: 4,
            secrets: Default::default(),
        };
        assert_eq!(
            delta.encode_to_vec(),
            [0x0a, 1, b'a', 0x12, 1, b'b', 0x18, 3, 0x20, 4]
        );
        let snap = proto::Snapshot {
            group_snapshot_id: "g".into(),
            ..Default::default()
        };
        assert_eq!(snap.encode_to_vec(), [0x32, 1, b'g']);
        let create = proto::CreateVolumeRequest {
            mutable_parameters: [("k".to_string(), "v".to_string())].into(),
            ..Default::default()
        };
        // Field 8, length-delimited map entry {1: "k", 2: "v"}.
        assert_eq!(
            create.encode_to_vec(),
            [0x42, 6, 0x0a, 1, b'k', 0x12, 1, b'v']
        );
    }
}
