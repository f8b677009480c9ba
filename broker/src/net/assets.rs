//! Files served by the HTTP listener, embedded in the binary (no npm step, no files on disk):
//! the demo chat page (`client/js/demo/`) and the browser client it uses
//! (`client/js/switchboard.js`).

/// `(path, content type, body)` of every embedded file.
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "/index.html",
        "text/html; charset=utf-8",
        include_bytes!("../../../client/js/demo/index.html"),
    ),
    ("/app.js", "text/javascript; charset=utf-8", include_bytes!("../../../client/js/demo/app.js")),
    ("/style.css", "text/css; charset=utf-8", include_bytes!("../../../client/js/demo/style.css")),
    (
        "/switchboard.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../../client/js/switchboard.js"),
    ),
    (
        "/switchboard.d.ts",
        "text/plain; charset=utf-8",
        include_bytes!("../../../client/js/switchboard.d.ts"),
    ),
];

/// The embedded file at `path` (`/` is the demo page): its content type and body.
#[must_use]
pub fn get(path: &str) -> Option<(&'static str, &'static [u8])> {
    let path = if path == "/" { "/index.html" } else { path };
    ASSETS.iter().find(|(p, _, _)| *p == path).map(|(_, t, b)| (*t, *b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_root_should_serve_the_demo_page_and_its_scripts() {
        let (t, body) = get("/").expect("index");
        assert!(t.starts_with("text/html"));
        let page = String::from_utf8_lossy(body);
        assert!(page.contains("/app.js"), "the page loads its script");
        assert!(get("/switchboard.js").is_some());
        assert!(get("/../Cargo.toml").is_none());
    }
}
