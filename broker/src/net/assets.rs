//! Files served by the HTTP listener, embedded in the binary (no npm step, no files on disk):
//! the demo chat page and the browser client it uses.

/// `(path, content type, body)` of every embedded file.
const ASSETS: &[(&str, &str, &[u8])] = &[];

/// The embedded file at `path` (`/` is the demo page): its content type and body.
#[must_use]
pub fn get(path: &str) -> Option<(&'static str, &'static [u8])> {
    let path = if path == "/" { "/index.html" } else { path };
    ASSETS.iter().find(|(p, _, _)| *p == path).map(|(_, t, b)| (*t, *b))
}
