//! The `static` route handler: GET/HEAD of files under a root, with validators, conditionals and ranges.

use super::file_cache::FileCache;
use crate::config::StaticCacheConfig;
use crate::http::body::{FileBody, ResponseBody};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// httpdate panics on dates from the year 10000 on, so such a modification time gets no Last-Modified.
const HTTP_DATE_LIMIT_SECS: u64 = 253_402_300_800;

/// No common filesystem allows longer names; refusing them here turns ENAMETOOLONG into a 404, not a 500.
const MAX_SEGMENT_LEN: usize = 255;

/// Serves files under a root directory.
#[derive(Clone, Debug)]
pub struct StaticFiles {
    root: PathBuf,
    /// Shared by the clones of one route; None when `[static_cache]` turns it off.
    cache: Option<Arc<FileCache>>,
}

/// A resolved file: small ones already read, larger ones open and streamed.
enum FileContent {
    Small(Bytes),
    Open(std::fs::File),
}

/// What a request path names, once resolved and confined to the root.
enum Target {
    File { meta: Arc<FileMeta>, content: FileContent },
    Redirect(HeaderValue),
    NotFound,
}

/// A resolved regular file: everything its responses carry except its bytes, computed once per
/// resolution so that a cached file costs no formatting per request.
#[derive(Debug)]
pub(super) struct FileMeta {
    size: u64,
    validators: Validators,
    /// From the path as requested (before symlinks), so the type follows the name the client asked for.
    content_type: HeaderValue,
}

/// Validators of the selected representation.
#[derive(Debug)]
struct Validators {
    etag: String,
    etag_value: Option<HeaderValue>,
    /// Truncated to whole seconds, since that is all an HTTP-date can carry and compare.
    last_modified: Option<SystemTime>,
    last_modified_value: Option<HeaderValue>,
    /// RFC 9110 §8.8.2.2: a modification date is only a strong validator once at least a second old.
    last_modified_strong: bool,
}

/// The outcome of evaluating the Range header against the representation.
#[derive(Debug, PartialEq, Eq)]
enum RangeOutcome {
    Full,
    Partial { start: u64, len: u64 },
    Unsatisfiable,
}

impl StaticFiles {
    /// `root` must be an existing directory; it is canonicalized once here.
    pub fn new(root: &Path, cache: &StaticCacheConfig) -> io::Result<StaticFiles> {
        let root = std::fs::canonicalize(root)?;
        if !std::fs::metadata(&root)?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("static root {} is not a directory", root.display()),
            ));
        }
        Ok(StaticFiles {
            root,
            cache: FileCache::new(cache).map(Arc::new),
        })
    }

    /// `rel_path` is the request path with the route's prefix already stripped (it may be "" or start with "/"),
    /// still percent-encoded exactly as it appeared in the request URI (no query).
    pub async fn serve(
        &self,
        method: &http::Method,
        rel_path: &str,
        headers: &http::HeaderMap,
    ) -> Response<ResponseBody> {
        let head = if *method == Method::GET {
            false
        } else if *method == Method::HEAD {
            true
        } else {
            let mut resp = text_response(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n", false);
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return resp;
        };

        // The key is the path as sent: one that was cached decoded and resolved to a file before.
        if let Some(cache) = &self.cache {
            if let Some((meta, body)) = cache.fresh(rel_path, Instant::now()) {
                return respond_file(head, headers, &meta, FileContent::Small(body));
            }
        }
        let Some(segments) = decode_path(rel_path) else {
            return text_response(StatusCode::NOT_FOUND, "not found\n", head);
        };
        let resolved = self.resolve(rel_path, &segments).await;
        if let Some(cache) = &self.cache {
            match &resolved {
                Ok(Target::File {
                    meta,
                    content: FileContent::Small(body),
                }) => cache.insert(rel_path, meta.clone(), body.clone(), Instant::now()),
                _ => cache.remove(rel_path),
            }
        }
        match resolved {
            Ok(Target::File { meta, content }) => respond_file(head, headers, &meta, content),
            Ok(Target::Redirect(location)) => {
                let mut resp = Response::new(ResponseBody::empty());
                *resp.status_mut() = StatusCode::MOVED_PERMANENTLY;
                resp.headers_mut().insert(header::LOCATION, location);
                resp.headers_mut()
                    .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
                resp
            }
            Ok(Target::NotFound) => text_response(StatusCode::NOT_FOUND, "not found\n", head),
            Err(e) => io_error_response(&e, rel_path, head),
        }
    }

    /// Resolves the request path in one trip to the blocking pool. Every file system call here
    /// (canonicalize, metadata, open, fstat, and the read of a small file) blocks; as separate
    /// `tokio::fs` calls each was its own round trip through the pool, which measured as most of
    /// the CPU a small static response cost (see docs/performance.md).
    async fn resolve(&self, rel_path: &str, segments: &[String]) -> io::Result<Target> {
        let root = self.root.clone();
        let rel_path = rel_path.to_string();
        let segments = segments.to_vec();
        let read_whole = self.cache.as_ref().map_or(SMALL_FILE, |c| c.max_file_size());
        tokio::task::spawn_blocking(move || resolve_blocking(&root, &rel_path, &segments, read_whole))
            .await
            .map_err(io::Error::other)?
    }
}

/// Without a cache, files up to this size are read whole during resolution and served from memory.
const SMALL_FILE: u64 = 64 * 1024;

/// Files up to `read_whole` bytes are read during resolution; larger ones are left open to stream.
fn resolve_blocking(root: &Path, rel_path: &str, segments: &[String], read_whole: u64) -> io::Result<Target> {
    let mut name = root.to_path_buf();
    name.extend(segments);
    // "" is the route prefix itself; there is no last segment to redirect with, so it acts as "/".
    let wants_dir = rel_path.is_empty() || rel_path.ends_with('/');

    let Some((mut real, mut meta)) = confine(root, &name)? else {
        return Ok(Target::NotFound);
    };
    if meta.is_dir() {
        if !wants_dir {
            return Ok(redirect_to_dir(rel_path));
        }
        name.push("index.html");
        // index.html may itself be a symlink, so it is confined like any other target.
        match confine(root, &name)? {
            Some((r, m)) => (real, meta) = (r, m),
            None => return Ok(Target::NotFound),
        }
    } else if wants_dir {
        // A file addressed as a directory would make the client resolve relative links wrongly.
        return Ok(Target::NotFound);
    }
    // Opening a FIFO or device could block or have side effects, so only regular files are opened.
    if !meta.is_file() {
        return Ok(Target::NotFound);
    }
    let file = std::fs::File::open(&real)?;
    // The file may have been swapped since the path was checked; the open handle's metadata is what is served.
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Ok(Target::NotFound);
    }
    let validators = Validators::of(&meta, SystemTime::now());
    let (content, size) = if meta.len() <= read_whole {
        let mut buf = Vec::with_capacity(meta.len() as usize);
        // A file shrinking under us is served as what could be read, so Content-Length stays true.
        io::Read::read_to_end(&mut io::Read::take(&file, meta.len()), &mut buf)?;
        let size = buf.len() as u64;
        (FileContent::Small(Bytes::from(buf)), size)
    } else {
        (FileContent::Open(file), meta.len())
    };
    Ok(Target::File {
        meta: Arc::new(FileMeta {
            size,
            validators,
            content_type: content_type(&name),
        }),
        content,
    })
}

/// The canonical path and metadata of `path`, or None if it resolves outside the root or does not exist.
fn confine(root: &Path, path: &Path) -> io::Result<Option<(PathBuf, std::fs::Metadata)>> {
    let real = match std::fs::canonicalize(path) {
        Ok(real) => real,
        Err(e) if is_not_found(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    if !real.starts_with(root) {
        return Ok(None);
    }
    match std::fs::metadata(&real) {
        Ok(meta) => Ok(Some((real, meta))),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Percent-decodes the path into its segments, or None for anything that must not reach the filesystem.
fn decode_path(rel_path: &str) -> Option<Vec<String>> {
    let bytes = percent_encoding::percent_decode_str(rel_path).collect::<Vec<u8>>();
    let decoded = String::from_utf8(bytes).ok()?;
    if decoded.contains('\0') || decoded.contains('\\') {
        return None;
    }
    let mut segments = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => return None,
            _ if seg.len() > MAX_SEGMENT_LEN => return None,
            _ => segments.push(seg.to_owned()),
        }
    }
    Some(segments)
}

/// A redirect that appends "/" to the request path.
///
/// The handler only sees the path below the route prefix, so it cannot write the absolute path; a reference
/// relative to the last segment resolves (RFC 3986 §5.2) to the original path plus "/" whatever the prefix.
fn redirect_to_dir(rel_path: &str) -> Target {
    let last = rel_path.rsplit('/').next().unwrap_or(rel_path);
    // A first segment with a colon would be read as a URI scheme.
    let location = if last.contains(':') {
        format!("./{last}/")
    } else {
        format!("{last}/")
    };
    match HeaderValue::try_from(location) {
        Ok(v) => Target::Redirect(v),
        Err(_) => Target::NotFound,
    }
}

fn is_not_found(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory)
}

fn io_error_response(e: &io::Error, rel_path: &str, head: bool) -> Response<ResponseBody> {
    match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory => {
            text_response(StatusCode::NOT_FOUND, "not found\n", head)
        }
        io::ErrorKind::PermissionDenied => text_response(StatusCode::FORBIDDEN, "forbidden\n", head),
        _ => {
            tracing::error!(path = rel_path, error = %e, "static file could not be served");
            text_response(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n", head)
        }
    }
}

/// A short plain-text response; for HEAD the body is dropped but its length still announced.
fn text_response(status: StatusCode, text: &'static str, head: bool) -> Response<ResponseBody> {
    let body = if head {
        ResponseBody::empty()
    } else {
        ResponseBody::from(text)
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(text.len()));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    resp
}

fn respond_file(head: bool, headers: &HeaderMap, meta: &FileMeta, content: FileContent) -> Response<ResponseBody> {
    let (size, validators) = (meta.size, &meta.validators);
    if let Some(status) = evaluate_preconditions(headers, validators) {
        return if status == StatusCode::NOT_MODIFIED {
            not_modified(validators)
        } else {
            text_response(status, "precondition failed\n", head)
        };
    }

    let range = if head {
        // RFC 9110 §14.2: range handling is defined for GET only.
        RangeOutcome::Full
    } else {
        evaluate_range(headers, validators, size)
    };

    let mut resp = Response::new(ResponseBody::empty());
    let h = resp.headers_mut();
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    validators.insert_into(h);

    let (start, len) = match range {
        RangeOutcome::Full => (0, size),
        RangeOutcome::Partial { start, len } => {
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
            let end = start + len - 1;
            insert_string(
                resp.headers_mut(),
                header::CONTENT_RANGE,
                format!("bytes {start}-{end}/{size}"),
            );
            (start, len)
        }
        RangeOutcome::Unsatisfiable => {
            *resp.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
            let h = resp.headers_mut();
            insert_string(h, header::CONTENT_RANGE, format!("bytes */{size}"));
            h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
            return resp;
        }
    };

    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, meta.content_type.clone());
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if !head && len > 0 {
        *resp.body_mut() = match content {
            FileContent::Small(bytes) => ResponseBody::full(bytes.slice(start as usize..(start + len) as usize)),
            FileContent::Open(file) => ResponseBody::File(FileBody::new(file, start, len)),
        };
    }
    resp
}

/// RFC 9110 §13.2.2 steps 1–4: the status that replaces the normal response, if a precondition says so.
fn evaluate_preconditions(headers: &HeaderMap, v: &Validators) -> Option<StatusCode> {
    if headers.contains_key(header::IF_MATCH) {
        // An If-Match that cannot be parsed cannot be satisfied, so it fails closed.
        let matched = parse_etag_list(headers, header::IF_MATCH).is_some_and(|tags| {
            tags.iter().any(|t| match t {
                TagItem::Any => true,
                TagItem::Tag(t) => strong_eq(t, &v.etag),
            })
        });
        if !matched {
            return Some(StatusCode::PRECONDITION_FAILED);
        }
    } else if let (Some(date), Some(lm)) = (header_date(headers, header::IF_UNMODIFIED_SINCE), v.last_modified) {
        if lm > date {
            return Some(StatusCode::PRECONDITION_FAILED);
        }
    }

    // Only GET and HEAD reach this point, for which a failed If-None-Match or If-Modified-Since means 304.
    if headers.contains_key(header::IF_NONE_MATCH) {
        let matched = parse_etag_list(headers, header::IF_NONE_MATCH).is_some_and(|tags| {
            tags.iter().any(|t| match t {
                TagItem::Any => true,
                TagItem::Tag(t) => weak_eq(t, &v.etag),
            })
        });
        if matched {
            return Some(StatusCode::NOT_MODIFIED);
        }
    } else if let (Some(date), Some(lm)) = (header_date(headers, header::IF_MODIFIED_SINCE), v.last_modified) {
        if lm <= date {
            return Some(StatusCode::NOT_MODIFIED);
        }
    }
    None
}

/// RFC 9110 §13.2.2 step 5 and §14.2.
fn evaluate_range(headers: &HeaderMap, v: &Validators, size: u64) -> RangeOutcome {
    let Some(range) = single_header(headers, &header::RANGE) else {
        return RangeOutcome::Full;
    };
    if headers.contains_key(header::IF_RANGE) && !if_range_matches(headers, v) {
        return RangeOutcome::Full;
    }
    parse_range(range, size)
}

fn if_range_matches(headers: &HeaderMap, v: &Validators) -> bool {
    let Some(value) = single_header(headers, &header::IF_RANGE) else {
        return false;
    };
    let value = value.trim();
    if value.starts_with('"') || value.starts_with("W/") {
        // A weak tag never matches: If-Range requires strong comparison.
        return value == v.etag;
    }
    match (httpdate::parse_http_date(value), v.last_modified) {
        (Ok(date), Some(lm)) => v.last_modified_strong && date == lm,
        _ => false,
    }
}

/// Parses a `Range` value against a representation of `size` bytes. Anything malformed is ignored (full 200),
/// as RFC 9110 §14.2 allows a server to ignore Range altogether.
fn parse_range(value: &str, size: u64) -> RangeOutcome {
    let Some((unit, set)) = value.split_once('=') else {
        return RangeOutcome::Full;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return RangeOutcome::Full;
    }
    let mut specs = set.split(',').map(str::trim).filter(|s| !s.is_empty());
    let (Some(spec), None) = (specs.next(), specs.next()) else {
        // Several ranges would need a multipart/byteranges body; ignoring Range and sending the whole
        // representation is permitted (RFC 9110 §14.2) and always correct.
        return RangeOutcome::Full;
    };
    let Some((first, last)) = spec.split_once('-') else {
        return RangeOutcome::Full;
    };
    let (first, last) = (first.trim(), last.trim());

    if first.is_empty() {
        let Some(suffix) = parse_pos(last) else {
            return RangeOutcome::Full;
        };
        if suffix == 0 || size == 0 {
            return RangeOutcome::Unsatisfiable;
        }
        let len = suffix.min(size);
        return RangeOutcome::Partial { start: size - len, len };
    }

    let Some(start) = parse_pos(first) else {
        return RangeOutcome::Full;
    };
    let end = if last.is_empty() {
        None
    } else {
        match parse_pos(last) {
            Some(end) if end >= start => Some(end),
            _ => return RangeOutcome::Full,
        }
    };
    if start >= size {
        return RangeOutcome::Unsatisfiable;
    }
    let end = end.map_or(size - 1, |e| e.min(size - 1));
    RangeOutcome::Partial {
        start,
        len: end - start + 1,
    }
}

/// A decimal position; one too large for u64 lies beyond any file, so it saturates rather than being rejected.
fn parse_pos(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.parse().unwrap_or(u64::MAX))
}

enum TagItem<'a> {
    Any,
    Tag(&'a str),
}

/// All members of an entity-tag list header across its field lines, or None if any line is malformed.
/// A tag is kept as it appeared (`W/"x"` or `"x"`), quotes included.
fn parse_etag_list(headers: &HeaderMap, name: HeaderName) -> Option<Vec<TagItem<'_>>> {
    let mut items = Vec::new();
    for value in headers.get_all(name) {
        let mut rest = value.to_str().ok()?;
        loop {
            rest = rest.trim_start_matches([' ', '\t', ',']);
            if rest.is_empty() {
                break;
            }
            if let Some(after) = rest.strip_prefix('*') {
                items.push(TagItem::Any);
                rest = after;
            } else {
                let opaque_start = if rest.starts_with("W/") { 2 } else { 0 };
                let quoted = rest.get(opaque_start..)?.strip_prefix('"')?;
                let close = quoted.find('"')?;
                let end = opaque_start + 1 + close + 1;
                items.push(TagItem::Tag(rest.get(..end)?));
                rest = rest.get(end..)?;
            }
            // Members must be separated by a comma (and optional whitespace).
            let trimmed = rest.trim_start_matches([' ', '\t']);
            if !trimmed.is_empty() && !trimmed.starts_with(',') {
                return None;
            }
            rest = trimmed;
        }
    }
    Some(items)
}

fn strong_eq(tag: &str, etag: &str) -> bool {
    !tag.starts_with("W/") && tag == etag
}

fn weak_eq(tag: &str, etag: &str) -> bool {
    tag.strip_prefix("W/").unwrap_or(tag) == etag.strip_prefix("W/").unwrap_or(etag)
}

/// The value of a header that must appear once; repeated or non-ASCII values are treated as absent.
fn single_header<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (Some(v), None) => v.to_str().ok(),
        _ => None,
    }
}

/// An HTTP-date header; RFC 9110 §13.1.3–4 require ignoring one that is invalid.
fn header_date(headers: &HeaderMap, name: HeaderName) -> Option<SystemTime> {
    httpdate::parse_http_date(single_header(headers, &name)?.trim()).ok()
}

impl Validators {
    fn of(meta: &std::fs::Metadata, now: SystemTime) -> Validators {
        let mtime = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok());
        let mtime_nanos = mtime.map_or(0, |d| d.as_nanos());
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(meta);
        #[cfg(not(unix))]
        let inode = 0u64;
        // The second part concatenates inode and zero-padded size, which keeps the pair unambiguous.
        let etag = format!("\"{:x}-{:x}{:016x}\"", mtime_nanos, inode, meta.len());

        let now_secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        // RFC 9110 §8.8.2.1: a modification time in the future is replaced by the current time.
        let lm_secs = mtime
            .map(|d| d.as_secs().min(now_secs))
            .filter(|s| *s < HTTP_DATE_LIMIT_SECS);
        let last_modified = lm_secs.map(|s| UNIX_EPOCH + Duration::from_secs(s));
        Validators {
            etag_value: HeaderValue::try_from(etag.as_str()).ok(),
            etag,
            last_modified,
            last_modified_value: last_modified.and_then(|lm| HeaderValue::try_from(httpdate::fmt_http_date(lm)).ok()),
            last_modified_strong: lm_secs.is_some_and(|s| s < now_secs),
        }
    }

    fn insert_into(&self, h: &mut HeaderMap) {
        if let Some(v) = &self.etag_value {
            h.insert(header::ETAG, v.clone());
        }
        if let Some(v) = &self.last_modified_value {
            h.insert(header::LAST_MODIFIED, v.clone());
        }
    }
}

/// RFC 9110 §15.4.5: the validators, but no representation metadata and no Content-Length.
fn not_modified(v: &Validators) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::empty());
    *resp.status_mut() = StatusCode::NOT_MODIFIED;
    v.insert_into(resp.headers_mut());
    resp
}

fn content_type(name: &Path) -> HeaderValue {
    let value = match mime_guess::from_path(name).first() {
        Some(m) if m.type_() == mime_guess::mime::TEXT => {
            format!("{}; charset=utf-8", m.essence_str())
        }
        Some(m) => m.essence_str().to_owned(),
        None => return HeaderValue::from_static("application/octet-stream"),
    };
    HeaderValue::try_from(value).unwrap_or(HeaderValue::from_static("application/octet-stream"))
}

#[cfg(test)]
impl FileMeta {
    pub(super) fn for_test() -> FileMeta {
        FileMeta {
            size: 0,
            validators: Validators {
                etag: "\"x\"".to_string(),
                etag_value: None,
                last_modified: None,
                last_modified_value: None,
                last_modified_strong: false,
            },
            content_type: HeaderValue::from_static("text/plain"),
        }
    }
}

/// Every value built here is ASCII by construction; a value that somehow is not is left out rather than panicking.
fn insert_string(h: &mut HeaderMap, name: HeaderName, value: String) {
    if let Ok(v) = HeaderValue::try_from(value) {
        h.insert(name, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    struct Fixture {
        dir: tempfile::TempDir,
        files: StaticFiles,
    }

    /// root/hello.txt (10 bytes), root/sub/index.html, root/empty/, root/zero.bin, and outside.txt beside root.
    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("sub")).expect("mkdir sub");
        std::fs::create_dir_all(root.join("empty")).expect("mkdir empty");
        std::fs::write(root.join("hello.txt"), b"0123456789").expect("write");
        std::fs::write(root.join("sub/index.html"), b"<p>sub</p>").expect("write");
        std::fs::write(root.join("index.html"), b"<p>root</p>").expect("write");
        std::fs::write(root.join("zero.bin"), b"").expect("write");
        std::fs::write(root.join("data.unknownext"), b"xyz").expect("write");
        std::fs::write(dir.path().join("outside.txt"), b"secret").expect("write");
        let files = StaticFiles::new(&root, &StaticCacheConfig::default()).expect("new");
        Fixture { dir, files }
    }

    async fn req(f: &Fixture, method: Method, path: &str, hdrs: &[(&str, &str)]) -> (StatusCode, HeaderMap, Vec<u8>) {
        let mut headers = HeaderMap::new();
        for (k, v) in hdrs {
            headers.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        let resp = f.files.serve(&method, path, &headers).await;
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.expect("body").to_bytes();
        (parts.status, parts.headers, bytes.to_vec())
    }

    async fn get(f: &Fixture, path: &str, hdrs: &[(&str, &str)]) -> (StatusCode, HeaderMap, Vec<u8>) {
        req(f, Method::GET, path, hdrs).await
    }

    fn hv<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
        h.get(name).and_then(|v| v.to_str().ok())
    }

    #[tokio::test]
    async fn get_full_body_and_headers() {
        let f = fixture();
        let (status, h, body) = get(&f, "/hello.txt", &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, b"0123456789");
        assert_eq!(hv(&h, "content-type"), Some("text/plain; charset=utf-8"));
        assert_eq!(hv(&h, "content-length"), Some("10"));
        assert_eq!(hv(&h, "accept-ranges"), Some("bytes"));
        assert_eq!(hv(&h, "x-content-type-options"), Some("nosniff"));
        let etag = hv(&h, "etag").expect("etag");
        let inner = etag
            .strip_prefix('"')
            .and_then(|e| e.strip_suffix('"'))
            .expect("quoted");
        let (a, b) = inner.split_once('-').expect("two parts");
        assert!(!a.is_empty() && a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert!(!b.is_empty() && b.bytes().all(|c| c.is_ascii_hexdigit()));
        let lm = hv(&h, "last-modified").expect("last-modified");
        assert!(httpdate::parse_http_date(lm).is_ok());
    }

    #[tokio::test]
    async fn content_types() {
        let f = fixture();
        let (_, h, _) = get(&f, "/data.unknownext", &[]).await;
        assert_eq!(hv(&h, "content-type"), Some("application/octet-stream"));
        let (_, h, _) = get(&f, "/sub/", &[]).await;
        assert_eq!(hv(&h, "content-type"), Some("text/html; charset=utf-8"));
    }

    #[tokio::test]
    async fn empty_file() {
        let f = fixture();
        let (status, h, body) = get(&f, "/zero.bin", &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.is_empty());
        assert_eq!(hv(&h, "content-length"), Some("0"));
        let (status, h, _) = get(&f, "/zero.bin", &[("range", "bytes=0-")]).await;
        assert_eq!(status, StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(hv(&h, "content-range"), Some("bytes */0"));
        let (status, _, _) = get(&f, "/zero.bin", &[("range", "bytes=-5")]).await;
        assert_eq!(status, StatusCode::RANGE_NOT_SATISFIABLE);
    }

    #[tokio::test]
    async fn head_has_get_headers_and_no_body() {
        let f = fixture();
        let (_, gh, _) = get(&f, "/hello.txt", &[]).await;
        let (status, h, body) = req(&f, Method::HEAD, "/hello.txt", &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.is_empty());
        assert_eq!(h, gh);
        // Range is defined for GET only.
        let (status, h2, _) = req(&f, Method::HEAD, "/hello.txt", &[("range", "bytes=0-1")]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(h2, gh);
        let (status, h, body) = req(&f, Method::HEAD, "/missing", &[]).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body.is_empty());
        assert_eq!(hv(&h, "content-length"), Some("10"));
    }

    #[tokio::test]
    async fn other_methods_get_405() {
        let f = fixture();
        for m in [Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS] {
            let (status, h, _) = req(&f, m, "/hello.txt", &[]).await;
            assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
            assert_eq!(hv(&h, "allow"), Some("GET, HEAD"));
        }
    }

    #[tokio::test]
    async fn if_none_match() {
        let f = fixture();
        let (_, h, _) = get(&f, "/hello.txt", &[]).await;
        let etag = hv(&h, "etag").expect("etag").to_owned();
        let lm = hv(&h, "last-modified").expect("lm").to_owned();

        let (status, h, body) = get(&f, "/hello.txt", &[("if-none-match", &etag)]).await;
        assert_eq!(status, StatusCode::NOT_MODIFIED);
        assert!(body.is_empty());
        assert_eq!(hv(&h, "etag"), Some(etag.as_str()));
        assert_eq!(hv(&h, "last-modified"), Some(lm.as_str()));
        assert!(h.get("content-length").is_none());

        let weak = format!("\"nope\", W/{etag}");
        let (status, _, _) = get(&f, "/hello.txt", &[("if-none-match", &weak)]).await;
        assert_eq!(status, StatusCode::NOT_MODIFIED);
        let (status, _, _) = req(&f, Method::HEAD, "/hello.txt", &[("if-none-match", "*")]).await;
        assert_eq!(status, StatusCode::NOT_MODIFIED);
        let (status, _, body) = get(&f, "/hello.txt", &[("if-none-match", "\"other\"")]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, b"0123456789");
        // If-Modified-Since is ignored when If-None-Match is present.
        let (status, _, _) = get(
            &f,
            "/hello.txt",
            &[("if-none-match", "\"other\""), ("if-modified-since", &lm)],
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn if_modified_since() {
        let f = fixture();
        let (_, h, _) = get(&f, "/hello.txt", &[]).await;
        let lm = hv(&h, "last-modified").expect("lm").to_owned();
        let (status, h, _) = get(&f, "/hello.txt", &[("if-modified-since", &lm)]).await;
        assert_eq!(status, StatusCode::NOT_MODIFIED);
        assert!(h.get("content-length").is_none());
        let earlier = "Sun, 06 Nov 1994 08:49:37 GMT";
        let (status, _, _) = get(&f, "/hello.txt", &[("if-modified-since", earlier)]).await;
        assert_eq!(status, StatusCode::OK);
        let (status, _, _) = get(&f, "/hello.txt", &[("if-modified-since", "garbage")]).await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn if_match_and_if_unmodified_since() {
        let f = fixture();
        let (_, h, _) = get(&f, "/hello.txt", &[]).await;
        let etag = hv(&h, "etag").expect("etag").to_owned();
        let (status, _, _) = get(&f, "/hello.txt", &[("if-match", "\"other\"")]).await;
        assert_eq!(status, StatusCode::PRECONDITION_FAILED);
        // If-Match uses strong comparison.
        let (status, _, _) = get(&f, "/hello.txt", &[("if-match", &format!("W/{etag}"))]).await;
        assert_eq!(status, StatusCode::PRECONDITION_FAILED);
        let (status, _, _) = get(&f, "/hello.txt", &[("if-match", &format!("\"a\", {etag}"))]).await;
        assert_eq!(status, StatusCode::OK);
        let (status, _, _) = get(&f, "/hello.txt", &[("if-match", "*")]).await;
        assert_eq!(status, StatusCode::OK);

        let earlier = "Sun, 06 Nov 1994 08:49:37 GMT";
        let (status, _, _) = get(&f, "/hello.txt", &[("if-unmodified-since", earlier)]).await;
        assert_eq!(status, StatusCode::PRECONDITION_FAILED);
        // If-Unmodified-Since is ignored when If-Match is present.
        let (status, _, _) = get(&f, "/hello.txt", &[("if-match", "*"), ("if-unmodified-since", earlier)]).await;
        assert_eq!(status, StatusCode::OK);
        // If-Match is evaluated before If-None-Match.
        let (status, _, _) = get(&f, "/hello.txt", &[("if-match", "\"x\""), ("if-none-match", &etag)]).await;
        assert_eq!(status, StatusCode::PRECONDITION_FAILED);
    }

    #[tokio::test]
    async fn single_ranges() {
        let f = fixture();
        let cases = [
            ("bytes=2-5", "bytes 2-5/10", &b"2345"[..]),
            ("bytes=7-", "bytes 7-9/10", b"789"),
            ("bytes=-3", "bytes 7-9/10", b"789"),
            ("bytes=-30", "bytes 0-9/10", b"0123456789"),
            ("bytes=8-100", "bytes 8-9/10", b"89"),
            ("bytes=9-9", "bytes 9-9/10", b"9"),
            ("bytes=0-99999999999999999999999", "bytes 0-9/10", b"0123456789"),
        ];
        for (range, content_range, expected) in cases {
            let (status, h, body) = get(&f, "/hello.txt", &[("range", range)]).await;
            assert_eq!(status, StatusCode::PARTIAL_CONTENT, "{range}");
            assert_eq!(hv(&h, "content-range"), Some(content_range), "{range}");
            assert_eq!(hv(&h, "content-length"), Some(expected.len().to_string().as_str()));
            assert_eq!(hv(&h, "accept-ranges"), Some("bytes"));
            assert_eq!(body, expected, "{range}");
        }
    }

    #[tokio::test]
    async fn unsatisfiable_ranges() {
        let f = fixture();
        for range in ["bytes=10-", "bytes=10-20", "bytes=-0", "bytes=99999999999999999999999-"] {
            let (status, h, body) = get(&f, "/hello.txt", &[("range", range)]).await;
            assert_eq!(status, StatusCode::RANGE_NOT_SATISFIABLE, "{range}");
            assert_eq!(hv(&h, "content-range"), Some("bytes */10"));
            assert!(body.is_empty());
        }
    }

    #[tokio::test]
    async fn ignored_ranges() {
        let f = fixture();
        for range in [
            "bytes=0-1,5-6",
            "bytes=5-2",
            "items=0-1",
            "bytes=abc",
            "bytes=",
            "bytes=1-2-3",
            "0-1",
        ] {
            let (status, h, body) = get(&f, "/hello.txt", &[("range", range)]).await;
            assert_eq!(status, StatusCode::OK, "{range}");
            assert!(h.get("content-range").is_none());
            assert_eq!(body, b"0123456789", "{range}");
        }
    }

    #[tokio::test]
    async fn if_range() {
        let f = fixture();
        let (_, h, _) = get(&f, "/hello.txt", &[]).await;
        let etag = hv(&h, "etag").expect("etag").to_owned();
        let range = ("range", "bytes=0-1");
        let (status, _, body) = get(&f, "/hello.txt", &[range, ("if-range", &etag)]).await;
        assert_eq!(status, StatusCode::PARTIAL_CONTENT);
        assert_eq!(body, b"01");
        let (status, _, body) = get(&f, "/hello.txt", &[range, ("if-range", "\"stale\"")]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, b"0123456789");
        let (status, _, _) = get(&f, "/hello.txt", &[range, ("if-range", &format!("W/{etag}"))]).await;
        assert_eq!(status, StatusCode::OK);
        let old = "Sun, 06 Nov 1994 08:49:37 GMT";
        let (status, _, _) = get(&f, "/hello.txt", &[range, ("if-range", old)]).await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn if_range_date_matches_only_strong_last_modified() {
        let f = fixture();
        let path = f.dir.path().join("root/hello.txt");
        let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|file| file.set_modified(old))
            .expect("set mtime");
        let date = httpdate::fmt_http_date(old);
        let (status, h, body) = get(&f, "/hello.txt", &[("range", "bytes=0-1"), ("if-range", &date)]).await;
        assert_eq!(status, StatusCode::PARTIAL_CONTENT);
        assert_eq!(hv(&h, "last-modified"), Some(date.as_str()));
        assert_eq!(body, b"01");
    }

    #[tokio::test]
    async fn traversal_is_404() {
        let f = fixture();
        for path in [
            "/../outside.txt",
            "/%2e%2e/outside.txt",
            "/%2E%2E/outside.txt",
            "/sub/../../outside.txt",
            "/sub/%2e%2e/hello.txt",
            "/..%2foutside.txt",
            "/hello.txt%00",
            "/sub%5c..%5chello.txt",
            "/%ff",
        ] {
            let (status, h, body) = get(&f, path, &[]).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
            assert_eq!(body, b"not found\n");
            assert_eq!(hv(&h, "content-type"), Some("text/plain; charset=utf-8"));
        }
        let (status, _, _) = get(&f, "/missing.txt", &[]).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _, _) = get(&f, "/hello.txt/", &[]).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _, _) = get(&f, "/hello.txt/x", &[]).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let long = format!("/{}", "a".repeat(300));
        let (status, _, _) = get(&f, &long, &[]).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn percent_decoding() {
        let f = fixture();
        std::fs::write(f.dir.path().join("root/a b.txt"), b"space").expect("write");
        let (status, _, body) = get(&f, "/a%20b.txt", &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, b"space");
        let (status, _, body) = get(&f, "/./sub//index.html", &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, b"<p>sub</p>");
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn symlinks() {
        let f = fixture();
        let root = f.dir.path().join("root");
        std::os::unix::fs::symlink(f.dir.path().join("outside.txt"), root.join("escape.txt")).expect("symlink");
        std::os::unix::fs::symlink(f.dir.path(), root.join("escape_dir")).expect("symlink");
        std::os::unix::fs::symlink(root.join("hello.txt"), root.join("alias.txt")).expect("symlink");
        std::os::unix::fs::symlink("sub", root.join("subalias")).expect("symlink");
        for path in ["/escape.txt", "/escape_dir/outside.txt", "/escape_dir/"] {
            let (status, _, _) = get(&f, path, &[]).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        }
        let (status, _, body) = get(&f, "/alias.txt", &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, b"0123456789");
        let (status, _, body) = get(&f, "/subalias/", &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, b"<p>sub</p>");
        // An index.html that escapes the root is refused too.
        std::fs::create_dir(root.join("trap")).expect("mkdir");
        std::os::unix::fs::symlink(f.dir.path().join("outside.txt"), root.join("trap/index.html")).expect("symlink");
        let (status, _, _) = get(&f, "/trap/", &[]).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn permission_denied_is_403() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let f = fixture();
        let path = f.dir.path().join("root/locked.txt");
        std::fs::write(&path, b"locked").expect("write");
        // root bypasses permission bits, so the check would be meaningless there.
        if std::fs::metadata(&path).expect("meta").uid() == 0 {
            return;
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o000)).expect("chmod");
        let (status, _, body) = get(&f, "/locked.txt", &[]).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(body, b"forbidden\n");
    }

    #[tokio::test]
    async fn directories() {
        let f = fixture();
        let (status, h, body) = get(&f, "/sub", &[]).await;
        assert_eq!(status, StatusCode::MOVED_PERMANENTLY);
        assert_eq!(hv(&h, "location"), Some("sub/"));
        assert!(body.is_empty());
        let (status, _, body) = get(&f, "/sub/", &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, b"<p>sub</p>");
        let (status, _, body) = get(&f, "/empty/", &[]).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body, b"not found\n");
        for root in ["", "/"] {
            let (status, _, body) = get(&f, root, &[]).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body, b"<p>root</p>");
        }
    }

    #[test]
    fn new_rejects_non_directories() {
        let f = fixture();
        let c = StaticCacheConfig::default();
        assert!(StaticFiles::new(&f.dir.path().join("outside.txt"), &c).is_err());
        assert!(StaticFiles::new(&f.dir.path().join("nope"), &c).is_err());
    }
}
