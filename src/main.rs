//! The `localvol` command: `localvol serve` runs the CSI driver.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use localvol::volumes::Config;

#[derive(Parser)]
#[command(
    name = "localvol",
    version,
    about = "A CSI driver for node-local directory and loop-device volumes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the CSI Identity, Controller and Node services on a unix socket.
    Serve {
        /// The unix socket to listen on.
        #[arg(
            long,
            env = "CSI_ENDPOINT",
            default_value = "unix:///run/localvol/csi.sock"
        )]
        endpoint: String,
        /// This node's id (as Kubernetes knows the node); default: the host name.
        #[arg(long, env = "NODE_ID")]
        node_id: Option<String>,
        /// The CSI driver name, as in the CSIDriver object.
        #[arg(long, default_value = "localvol.csi.io")]
        driver_name: String,
        /// Where volumes and their records live.
        #[arg(long, default_value = "/var/lib/localvol")]
        root: PathBuf,
        /// A filesystem mounted at the same path on every node (NFS, ...), for
        /// volumes with StorageClass parameter shared: "true".
        #[arg(long)]
        shared_root: Option<PathBuf>,
        /// On a btrfs root with quotas off, turn them on so that directory volumes
        /// get size limits (qgroup accounting costs some write speed).
        #[arg(long)]
        enable_btrfs_quota: bool,
        /// Do not offer ControllerExpandVolume: NodeExpandVolume grows the volume on
        /// the node that holds it. Use this on multi-node clusters, where the one
        /// external-resizer cannot reach other nodes' drivers.
        #[arg(long)]
        node_expansion_only: bool,
        /// Log format; the level comes from RUST_LOG (default info).
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            endpoint,
            node_id,
            driver_name,
            root,
            shared_root,
            enable_btrfs_quota,
            node_expansion_only,
            log_format,
        } => {
            init_logging(log_format);
            if !is_dns_name(&driver_name) {
                eprintln!("localvol: --driver-name {driver_name:?} must be a DNS name of at most 63 characters");
                return ExitCode::from(2);
            }
            let node_id = match node_id {
                Some(n) if !n.is_empty() => n,
                _ => match nix::unistd::gethostname() {
                    Ok(h) => h.to_string_lossy().into_owned(),
                    Err(e) => {
                        eprintln!("localvol: cannot read the host name ({e}); pass --node-id");
                        return ExitCode::from(2);
                    }
                },
            };
            let cfg = Config {
                root,
                shared_root,
                node_id,
                driver_name,
                enable_btrfs_quota,
                node_expansion_only,
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            let result = rt.block_on(localvol::server::serve(cfg, &endpoint));
            // Do not wait on a call stuck in the kernel past the grace period.
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("localvol: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
