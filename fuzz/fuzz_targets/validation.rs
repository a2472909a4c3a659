//! libFuzzer target over request validation and id parsing: the input is split
//! at 0xff bytes into strings (lossily decoded, as tonic only hands over UTF-8)
//! and fed to every validator; any panic or broken invariant is a finding.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use localvol::ids::{self, Kind};
use localvol::mount::{parse_mountinfo, Flags};
use localvol::params::{self, VolumeType};

fuzz_target!(|data: &[u8]| {
    let parts: Vec<String> = data
        .split(|b| *b == 0xff)
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    let first = parts[0].as_str();

    for kind in [Kind::Volume, Kind::Snapshot] {
        let ok = ids::check_id(kind, first).is_ok();
        assert_eq!(ok, ids::is_valid_id(kind, first));
        if ok {
            let hash = first.split_once('-').unwrap().1;
            assert!(hash.len() == 32 && hash.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        }
    }
    if ids::check_name(first).is_ok() {
        assert!(!first.is_empty() && first.len() <= ids::MAX_NAME_LEN && !first.contains('\0'));
    }
    if let Ok(p) = ids::check_path("target_path", first) {
        assert!(p.is_absolute() && !first.contains('\0'));
        assert!(!first.split('/').any(|c| c == "." || c == ".."));
    }

    let map: BTreeMap<String, String> = parts
        .chunks(2)
        .map(|kv| (kv[0].clone(), kv.get(1).cloned().unwrap_or_default()))
        .collect();
    if let Ok(p) = params::parse(&map) {
        assert!(p.volume_type == VolumeType::Dir || !p.shared);
        assert!(p.fs_type.iter().all(|f| params::SUPPORTED_FS.contains(&f.as_str())));
    }

    if let Ok(f) = Flags::parse(&parts) {
        assert!(f.fs_options.iter().all(|o| !o.is_empty() && !o.contains(',') && !o.contains('\0')));
    }

    let text = parts.join("\n");
    assert!(parse_mountinfo(&text).len() <= text.lines().count());
});
