//! The `localvol` command: `localvol serve` runs the CSI driver; `status`,
//! `volumes` and `snapshots` show what a node's root holds.

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

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

/// Flags of the read-only commands.
#[derive(clap::Args)]
struct ShowArgs {
    /// The driver's root, as given to `serve --root`.
    #[arg(long, default_value = "/var/lib/localvol")]
    root: PathBuf,
    #[arg(long, value_enum, default_value = "table")]
    output: Output,
}

#[derive(Clone, Copy)]
enum Show {
    Status,
    Volumes,
    Snapshots,
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
        /// Serve Prometheus metrics at http://IP:PORT/metrics (off by default).
        #[arg(long, value_name = "IP:PORT")]
        metrics_address: Option<std::net::SocketAddr>,
        /// Seconds a call may run before it is answered DEADLINE_EXCEEDED.
        #[arg(long, value_name = "SECONDS", default_value_t = 120)]
        rpc_timeout: u64,
        /// Seconds to wait at start-up for another localvol serving the same root
        /// to exit (an old pod still stopping during a rolling update).
        #[arg(long, value_name = "SECONDS", default_value_t = 60)]
        root_lock_wait: u64,
    },
    /// Summary of the node's root (space, counts, health problems), then its volumes.
    /// Reads the root and the mount table: works with the driver stopped.
    Status(ShowArgs),
    /// The volumes of the node's root: PVC, size, used, mounts, snapshots, health.
    Volumes(ShowArgs),
    /// The snapshots of the node's root.
    Snapshots(ShowArgs),
}

fn show(what: Show, args: ShowArgs) -> ExitCode {
    use localvol::status;
    let report = match status::inspect(&args.root) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("localvol: {e}");
            return ExitCode::FAILURE;
        }
    };
    let text = match (args.output, what) {
        (Output::Json, Show::Status) => to_json(&report),
        (Output::Json, Show::Volumes) => to_json(&report.volumes),
        (Output::Json, Show::Snapshots) => to_json(&report.snapshots),
        (Output::Table, Show::Status) => format!(
            "{}\n{}",
            status::summary_text(&report.summary),
            status::volumes_table(&report.volumes)
        ),
        (Output::Table, Show::Volumes) => status::volumes_table(&report.volumes),
        (Output::Table, Show::Snapshots) => status::snapshots_table(&report.snapshots),
    };
    print!("{text}");
    ExitCode::SUCCESS
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    let mut s = serde_json::to_string_pretty(v).expect("reports serialize");
    s.push('\n');
    s
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person at a terminal: `kubectl logs` and log files get
    // plain text, without escape codes to strip (or to format on every call).
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
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
            metrics_address,
            rpc_timeout,
            root_lock_wait,
        } => {
            init_logging(log_format);
            if rpc_timeout == 0 || rpc_timeout > 86_400 {
                eprintln!("localvol: --rpc-timeout must be 1 to 86400 seconds");
                return ExitCode::from(2);
            }
            localvol::csi::deadline::set_rpc_timeout(std::time::Duration::from_secs(rpc_timeout));
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
                root_lock_wait: std::time::Duration::from_secs(root_lock_wait),
            };
            // One thread answers gRPC; the work of every call runs on the blocking
            // pool. More runtime threads only add wake-ups between them: on 2 cores
            // this runtime spends a fifth less CPU per call and gets more calls done.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            let result = rt.block_on(localvol::server::serve(cfg, &endpoint, metrics_address));
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
        Command::Status(a) => show(Show::Status, a),
        Command::Volumes(a) => show(Show::Volumes, a),
        Command::Snapshots(a) => show(Show::Snapshots, a),
    }
}
