//! The console's HTML: one `upon` engine whose default formatter escapes every value, the page
//! templates (`templates/`: a shared header with the trace search box, one file per page), and
//! [`Pages`], which renders them. Templates never see a value that is not escaped: `{{ x }}` is HTML-escaped,
//! `{{ x | url }}` is percent-encoded for a query string or path segment (and so safe in HTML).

/// The compiled page templates.
pub struct Pages {
    engine: upon::Engine<'static>,
}

impl std::fmt::Debug for Pages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pages").finish_non_exhaustive()
    }
}

/// Escapes the five characters that matter in HTML text and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes `text` for a URL path segment or query value: every byte but the unreserved
/// ones (letters, digits, `-._~`) becomes `%XX`.
pub fn url_component(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Why a page could not be rendered (a bug in this module: its tests render every page).
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("page template: {0}")]
    Template(#[from] upon::Error),
    #[error("no page template {0}")]
    Missing(String),
    #[error("the context of page {0} is not an object")]
    Context(String),
    #[error("page data: {0}")]
    Data(#[from] serde_json::Error),
}

/// A value as text: strings as they are, maps and lists as JSON, `None` empty.
fn text_of(v: &upon::Value) -> Result<String, upon::fmt::Error> {
    Ok(match v {
        upon::Value::None => String::new(),
        upon::Value::Bool(b) => b.to_string(),
        upon::Value::Integer(n) => n.to_string(),
        upon::Value::Float(n) => n.to_string(),
        upon::Value::String(s) => s.clone(),
        upon::Value::Map(_) | upon::Value::List(_) => {
            serde_json::to_string(v).map_err(|e| upon::fmt::Error::from(e.to_string()))?
        }
    })
}

/// The default formatter: every `{{ value }}` is HTML-escaped.
fn escaped(f: &mut upon::fmt::Formatter<'_>, v: &upon::Value) -> upon::fmt::Result {
    std::fmt::Write::write_str(f, &escape(&text_of(v)?))?;
    Ok(())
}

/// `{{ value | url }}`: percent-encoded.
fn url_encoded(f: &mut upon::fmt::Formatter<'_>, v: &upon::Value) -> upon::fmt::Result {
    std::fmt::Write::write_str(f, &url_component(&text_of(v)?))?;
    Ok(())
}

/// What the header shows on every page.
#[derive(Debug, Clone, Default)]
pub struct Chrome {
    /// A token is configured: writes are possible after signing in.
    pub writable: bool,
    /// This request may write (it carries the token or a signed-in session).
    pub can_write: bool,
    /// The request came with a signed-in session cookie.
    pub signed_in: bool,
    /// A one-line note about the last action (after a redirect).
    pub flash: Option<String>,
}

impl Pages {
    /// Compiles every page template.
    ///
    /// # Errors
    /// A template that does not compile (a bug in this module, caught by its tests).
    pub fn new() -> Result<Pages, RenderError> {
        let mut engine = upon::Engine::new();
        engine.set_default_formatter(&escaped);
        engine.add_formatter("url", url_encoded);
        for (name, source) in [
            ("head", include_str!("templates/head.html")),
            ("foot", include_str!("templates/foot.html")),
            ("overview", include_str!("templates/overview.html")),
            ("dlq_list", include_str!("templates/dlq_list.html")),
            ("dlq_show", include_str!("templates/dlq_show.html")),
            ("businesses", include_str!("templates/businesses.html")),
            (
                "conversations",
                include_str!("templates/conversations.html"),
            ),
            ("conversation", include_str!("templates/conversation.html")),
            ("trace", include_str!("templates/trace.html")),
            ("actions_list", include_str!("templates/actions_list.html")),
            ("action_show", include_str!("templates/action_show.html")),
            ("handoffs", include_str!("templates/handoffs.html")),
            ("audit", include_str!("templates/audit.html")),
            ("login", include_str!("templates/login.html")),
            ("error", include_str!("templates/error.html")),
        ] {
            engine.add_template(name, source)?;
        }
        Ok(Pages { engine })
    }

    /// Renders page `name` titled `title`: `body`'s fields (an object) plus `title` and `chrome`
    /// make the context.
    ///
    /// # Errors
    /// `body` is not an object, or the template does not render (a missing field).
    pub fn render(
        &self,
        name: &str,
        title: &str,
        chrome: &Chrome,
        body: serde_json::Value,
    ) -> Result<String, RenderError> {
        let serde_json::Value::Object(mut ctx) = body else {
            return Err(RenderError::Context(name.to_owned()));
        };
        ctx.insert("title".into(), title.into());
        ctx.insert(
            "chrome".into(),
            serde_json::json!({
                "writable": chrome.writable,
                "can_write": chrome.can_write,
                "signed_in": chrome.signed_in,
                "flash": chrome.flash,
            }),
        );
        let template = self
            .engine
            .get_template(name)
            .ok_or_else(|| RenderError::Missing(name.to_owned()))?;
        Ok(template.render(&ctx).to_string()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_replaces_markup_characters() {
        assert_eq!(
            escape(r#"<script>alert("x & 'y'")</script>"#),
            "&lt;script&gt;alert(&quot;x &amp; &#39;y&#39;&quot;)&lt;/script&gt;"
        );
        assert_eq!(escape("plain text é"), "plain text é");
    }

    #[test]
    fn every_value_a_page_shows_is_escaped() {
        let pages = Pages::new().expect("templates compile");
        let hostile = "<script>alert(1)</script>";
        let chrome = Chrome {
            flash: Some(hostile.to_owned()),
            ..Chrome::default()
        };
        let html = pages
            .render(
                "error",
                hostile,
                &chrome,
                serde_json::json!({ "message": hostile, "code": "\"><b>x</b>" }),
            )
            .expect("render");
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(!html.contains("<b>x</b>"), "{html}");
        assert!(
            html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{html}"
        );
    }

    #[test]
    fn url_formatter_encodes_a_path_segment() {
        let pages = Pages::new().expect("templates compile");
        let html = pages
            .render(
                "dlq_show",
                "x",
                &Chrome {
                    writable: true,
                    can_write: true,
                    ..Chrome::default()
                },
                serde_json::json!({
                    "id": "1-1\"/../x?<y>",
                    "message_id": "a b/c",
                    "fields": [{ "name": "content", "value": "<img src=x>" }],
                }),
            )
            .expect("render");
        assert!(
            html.contains("/dlq/1-1%22%2F..%2Fx%3F%3Cy%3E/replay"),
            "{html}"
        );
        assert!(html.contains("/trace/a%20b%2Fc"), "{html}");
        assert!(html.contains("&lt;img src=x&gt;"), "{html}");
    }
}
