//! Bounded randomized testing of the pure request-validation functions: the
//! stable toolchain cannot build libFuzzer targets (see fuzz/README.md), so this
//! runs in every `cargo test` with a fixed budget and a printed seed.
//! Reproduce a failure with `LOCALVOL_FUZZ_SEED=<seed> cargo test --test fuzz_validation`.

use std::collections::BTreeMap;

use localvol::ids::{self, Kind};
use localvol::mount::{parse_mountinfo, Flags};
use localvol::params::{self, VolumeType};

/// Inputs per function (five functions: 250,000 in all, a few seconds in debug).
const ROUNDS: usize = 50_000;

/// xorshift64*: tiny, deterministic, good enough to pick tokens.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.below(from.len())]
    }
}

fn seed() -> u64 {
    let seed = std::env::var("LOCALVOL_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
        | 1;
    println!("LOCALVOL_FUZZ_SEED={seed}");
    seed
}

/// Tokens that sit near the edges of what the validators accept.
const TOKENS: &[&str] = &[
    "/",
    "/",
    "/",
    ".",
    "..",
    "...",
    "vol-",
    "snap-",
    "a",
    "0",
    "f",
    "9",
    "F",
    "g",
    "-",
    "_",
    "\0",
    "\n",
    "\t",
    " ",
    " - ",
    "\\040",
    "\\",
    "\\7",
    "\u{85}",
    "\u{7f}",
    "é",
    "𝔵",
    "\u{202e}",
    ",",
    "=",
    ":",
    "ro",
    "rw",
    "noexec",
    "bind",
    "nosuid",
    "relatime",
    "type",
    "loop",
    "dir",
    "fsType",
    "ext4",
    "xfs",
    "allocation",
    "sparse",
    "preallocate",
    "enforceSize",
    "shared",
    "true",
    "false",
    "csi.storage.k8s.io/",
    "0123456789abcdef",
    "7:3",
    "253:0",
    "shared:1",
];

/// A string built from tokens, random characters and the occasional long run.
fn string(rng: &mut Rng) -> String {
    let mut s = String::new();
    let parts = rng.below(12);
    for _ in 0..parts {
        match rng.below(10) {
            0 => s.push(char::from_u32(rng.below(0x3000) as u32).unwrap_or('?')),
            1 if rng.below(50) == 0 => s.push_str(&"x".repeat(rng.below(5000))),
            2 => {
                // A whole id-shaped hash, sometimes one digit short or long.
                let n = 31 + rng.below(3);
                for _ in 0..n {
                    s.push(b"0123456789abcdef"[rng.below(16)] as char);
                }
            }
            _ => s.push_str(rng.pick(TOKENS)),
        }
    }
    s
}

fn valid_id_shape(id: &str) -> bool {
    let hash = id.strip_prefix("vol-").or_else(|| id.strip_prefix("snap-"));
    hash.is_some_and(|h| {
        h.len() == 32
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

#[test]
fn ids_and_names() {
    let mut rng = Rng(seed());
    let mut accepted = 0;
    for _ in 0..ROUNDS {
        let mut s = string(&mut rng);
        if rng.below(3) == 0 {
            // Near misses of a real id: a real one, then perhaps one token more.
            let name = string(&mut rng);
            let kind = if rng.below(2) == 0 {
                Kind::Volume
            } else {
                Kind::Snapshot
            };
            let id = ids::id_for_name(kind, &name);
            s = match rng.below(3) {
                0 => id,
                1 => format!("{id}{}", rng.pick(TOKENS)),
                _ => format!("{}{}", rng.pick(TOKENS), id),
            };
        }
        for kind in [Kind::Volume, Kind::Snapshot] {
            let ok = ids::check_id(kind, &s).is_ok();
            assert_eq!(ok, ids::is_valid_id(kind, &s), "{s:?}");
            if ok {
                accepted += 1;
                assert!(valid_id_shape(&s), "accepted id {s:?}");
                let prefix = if kind == Kind::Volume {
                    "vol-"
                } else {
                    "snap-"
                };
                assert!(s.starts_with(prefix), "{s:?} accepted as {kind:?}");
            }
        }
        if ids::check_name(&s).is_ok() {
            assert!(!s.is_empty() && s.len() <= ids::MAX_NAME_LEN, "{s:?}");
            assert!(!s.contains('\0'), "{s:?}");
            // Whatever the name, its id is a valid id: names never reach a path.
            let id = ids::id_for_name(Kind::Volume, &s);
            assert!(ids::is_valid_id(Kind::Volume, &id));
        }
    }
    println!("ids: {ROUNDS} inputs, {accepted} accepted");
}

#[test]
fn paths() {
    let mut rng = Rng(seed());
    let mut accepted = 0;
    for _ in 0..ROUNDS {
        let mut s = string(&mut rng);
        if rng.below(2) == 0 {
            s.insert(0, '/');
        }
        if let Ok(p) = ids::check_path("target_path", &s) {
            accepted += 1;
            assert!(p.is_absolute(), "{s:?}");
            assert!(p != std::path::Path::new("/"), "{s:?}");
            assert!(s.len() <= ids::MAX_PATH_LEN && !s.contains('\0'), "{s:?}");
            assert!(
                !s.split('/').any(|c| c == "." || c == ".."),
                "accepted path {s:?} has a '.' or '..' component"
            );
            assert!(
                p.components()
                    .all(|c| !matches!(c, std::path::Component::ParentDir)),
                "{s:?}"
            );
        }
    }
    println!("paths: {ROUNDS} inputs, {accepted} accepted");
}

#[test]
fn parameters() {
    const KEYS: &[&str] = &[
        "type",
        "fsType",
        "allocation",
        "enforceSize",
        "shared",
        "csi.storage.k8s.io/pvc/name",
    ];
    const KNOWN: &[&str] = &["type", "fsType", "allocation", "enforceSize", "shared"];
    let mut rng = Rng(seed());
    let mut accepted = 0;
    for _ in 0..ROUNDS {
        let mut m = BTreeMap::new();
        for _ in 0..rng.below(5) {
            let k = if rng.below(3) == 0 {
                string(&mut rng)
            } else {
                rng.pick(KEYS).to_string()
            };
            let v = if rng.below(3) == 0 {
                string(&mut rng)
            } else {
                rng.pick(TOKENS).to_string()
            };
            m.insert(k, v);
        }
        if let Ok(p) = params::parse(&m) {
            accepted += 1;
            for k in m.keys() {
                assert!(
                    KNOWN.contains(&k.as_str()) || k.starts_with(params::KUBERNETES_PREFIX),
                    "unknown key {k:?} accepted"
                );
            }
            if let Some(fs) = &p.fs_type {
                assert!(params::SUPPORTED_FS.contains(&fs.as_str()), "{fs:?}");
            }
            if p.volume_type == VolumeType::Loop {
                assert!(!p.shared);
            } else {
                assert!(p.fs_type.is_none());
            }
        }
    }
    println!("parameters: {ROUNDS} inputs, {accepted} accepted");
}

#[test]
fn mount_flags() {
    let mut rng = Rng(seed());
    let mut accepted = 0;
    for _ in 0..ROUNDS {
        let flags: Vec<String> = (0..rng.below(4)).map(|_| string(&mut rng)).collect();
        if let Ok(f) = Flags::parse(&flags) {
            accepted += 1;
            for o in &f.fs_options {
                assert!(
                    !o.is_empty() && !o.contains(',') && !o.contains('\0'),
                    "{o:?}"
                );
                assert!(o.len() <= 256 && o.trim() == o, "{o:?}");
            }
            let ro = flags
                .iter()
                .flat_map(|s| s.split(','))
                .any(|s| s.trim() == "ro");
            assert_eq!(f.is_readonly(), ro, "{flags:?}");
        }
    }
    println!("mount flags: {ROUNDS} inputs, {accepted} accepted");
}

#[test]
fn mountinfo() {
    let mut rng = Rng(seed());
    let mut entries = 0;
    for _ in 0..ROUNDS {
        let mut text = String::new();
        for _ in 0..rng.below(4) {
            if rng.below(2) == 0 {
                // Roughly the real shape, with random fields.
                let f: Vec<String> = (0..10).map(|_| string(&mut rng)).collect();
                text.push_str(&format!(
                    "{} {} {}:{} {} {} {} {} - {} {} {}\n",
                    f[0],
                    f[1],
                    rng.below(300),
                    rng.below(300),
                    f[2],
                    f[3],
                    f[4],
                    f[5],
                    f[6],
                    f[7],
                    f[8]
                ));
            } else {
                text.push_str(&string(&mut rng));
                text.push('\n');
            }
        }
        let parsed = parse_mountinfo(&text);
        assert!(parsed.len() <= text.lines().count(), "{text:?}");
        entries += parsed.len();
    }
    println!("mountinfo: {ROUNDS} inputs, {entries} entries parsed");
}
