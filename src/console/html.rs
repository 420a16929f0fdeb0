//! The console's HTML: one `upon` engine whose default formatter escapes every value, the page
//! templates (a shared header with the trace search box, one body per page), and [`Pages`],
//! which renders them. Templates never see a value that is not escaped: `{{ x }}` is HTML-escaped,
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

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222}\
header{background:#223;color:#fff;padding:.5em 1em;display:flex;gap:1.5em;align-items:center}\
header a{color:#fff}main{padding:1em}table{border-collapse:collapse;margin:.5em 0}\
td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}\
th{background:#eee}.flash{background:#e6f4e6;border:1px solid #6a6;padding:.5em}\
.warn{background:#fbeaea;border:1px solid #c66;padding:.5em}pre{white-space:pre-wrap;margin:0}\
.user{background:#f4f7ff}.assistant{background:#fff}form.inline{display:inline}";

const HEAD: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }} · icmp console</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{{ style }}</style></head>
<body><header><strong>icmp console</strong>
<a href="/">Overview</a> <a href="/dlq">Dead letters</a> <a href="/conversations">Conversations</a>
<form method="get" action="/trace" class="inline"><input name="id" placeholder="message_id, log_id or entry id" size="36" aria-label="trace id"> <button type="submit">Trace</button></form>
<span>{% if chrome.signed_in %}signed in · <form method="post" action="/logout" class="inline"><button type="submit">Sign out</button></form>{% else if chrome.writable %}<a href="/login">Sign in</a>{% else %}read-only{% endif %}</span>
</header><main>
{% if chrome.flash %}<p class="flash" id="flash">{{ chrome.flash }}</p>{% endif %}
<h1>{{ title }}</h1>
"#;

const FOOT: &str = "</main></body></html>\n";

const OVERVIEW: &str = r#"{% include "head" %}
{% if not status.group_exists %}<p class="warn">Stream {{ status.stream }}: no group {{ status.group }} yet (no worker has run).</p>
{% else %}<p>Stream <code>{{ status.stream }}</code> · group <code>{{ status.group }}</code>: lag <strong id="lag">{{ lag }}</strong> · pending <strong id="pending">{{ status.pending }}</strong></p>{% endif %}
<p>Order queues in use: {{ status.queues_in_use }} · <a href="/dlq">dead letters: <strong id="dead-letters">{{ status.dead_letters }}</strong></a></p>
<h2>Consumers</h2>
<table><tr><th>consumer</th><th>holds</th><th>idle</th></tr>
{% for c in status.consumers %}<tr><td>{{ c.name }}</td><td>{{ c.pending }}</td><td>{{ c.idle }} s</td></tr>
{% endfor %}</table>
<h2>Businesses, last {{ status.window_minutes }} minutes</h2>
<table id="businesses"><tr><th>business</th><th>replies</th><th>per minute</th><th>fallbacks</th><th>errors</th></tr>
{% for b in businesses %}<tr><td><a href="/conversations?business={{ b.business_id | url }}">{{ b.name }}</a><br><small>{{ b.business_id }}</small></td><td>{{ b.replies }}</td><td>{{ b.per_minute }}</td><td>{{ b.fallbacks }} ({{ b.fallback_percent }} %)</td><td>{{ b.errors }} ({{ b.error_percent }} %)</td></tr>
{% endfor %}</table>
{% if not businesses %}<p>No replies in the window.</p>{% endif %}
{% include "foot" %}"#;

const DLQ_LIST: &str = r#"{% include "head" %}
<form method="get" action="/dlq">
<label>business <input name="business" value="{{ filter.business }}"></label>
<label>code <input name="code" value="{{ filter.code }}"></label>
<label>older than (s) <input name="older_than_secs" value="{{ filter.older_than_secs }}" size="8"></label>
<button type="submit">Filter</button></form>
<p id="summary">{{ shown }} dead letter(s) shown{% if by_code %}; {% for c in by_code %}{{ c.code }}: {{ c.count }}{% if not loop.last %}, {% endif %}{% endfor %}{% endif %}</p>
<table id="dead-letters"><tr><th>id</th><th>code</th><th>business</th><th>user</th><th>message</th><th>deliveries</th><th>failed at</th><th>detail</th></tr>
{% for d in letters %}<tr><td><a href="/dlq/{{ d.id | url }}">{{ d.id }}</a></td><td>{{ d.error_code }}</td><td>{{ d.business_id }}</td><td>{{ d.user_id }}</td><td><a href="/trace/{{ d.message_id | url }}">{{ d.message_id }}</a></td><td>{{ d.deliveries }}</td><td>{{ d.failed_at }}</td><td>{{ d.error_detail }}</td></tr>
{% endfor %}</table>
{% if actions %}<h2>Recent actions</h2>
<table id="actions"><tr><th>at</th><th>action</th><th>dead letter</th><th>outcome</th><th>from</th></tr>
{% for a in actions %}<tr><td>{{ a.at }}</td><td>{{ a.action }}</td><td>{{ a.id }}</td><td>{{ a.outcome }}</td><td>{{ a.remote }}</td></tr>
{% endfor %}</table>{% endif %}
{% include "foot" %}"#;

const DLQ_SHOW: &str = r#"{% include "head" %}
<table id="fields">{% for f in fields %}<tr><th>{{ f.name }}</th><td><pre>{{ f.value }}</pre></td></tr>
{% endfor %}</table>
<p><a href="/trace/{{ message_id | url }}">Trace this message</a></p>
{% if chrome.can_write %}<form method="post" action="/dlq/{{ id | url }}/replay" class="inline"><button type="submit" id="replay">Replay</button></form>
<form method="post" action="/dlq/{{ id | url }}/purge" class="inline"><button type="submit" id="purge">Purge</button></form>
{% else if chrome.writable %}<p><a href="/login">Sign in</a> to replay or purge.</p>{% endif %}
{% include "foot" %}"#;

const BUSINESSES: &str = r#"{% include "head" %}
<table id="businesses"><tr><th>business</th><th>id</th></tr>
{% for b in businesses %}<tr><td><a href="/conversations?business={{ b.id | url }}">{{ b.name }}</a></td><td>{{ b.id }}</td></tr>
{% endfor %}</table>
{% include "foot" %}"#;

const CONVERSATIONS: &str = r#"{% include "head" %}
<p>Business {{ business_id }}: the {{ count }} most recently active conversation(s).</p>
<table id="conversations"><tr><th>conversation</th><th>user</th><th>stage</th><th>messages</th><th>updated</th></tr>
{% for c in conversations %}<tr><td><a href="/conversations/{{ c.id | url }}">{{ c.id }}</a></td><td>{{ c.user_id }}</td><td>{{ c.stage }}</td><td>{{ c.messages }}</td><td>{{ c.updated_at }}</td></tr>
{% endfor %}</table>
{% include "foot" %}"#;

const CONVERSATION: &str = r#"{% include "head" %}
<p>Business <a href="/conversations?business={{ c.business_id | url }}">{{ c.business_id }}</a> · user {{ c.user_id }} · stage <strong>{{ c.stage }}</strong> · version {{ c.version }} · started {{ c.created_at }}</p>
<table id="transcript"><tr><th>at</th><th>role</th><th>stage</th><th>reply from</th><th>message</th><th>trace</th></tr>
{% for m in c.messages %}<tr class="{{ m.role }}"><td>{{ m.created_at }}</td><td>{{ m.role }}</td><td>{{ m.stage }}</td><td>{% if m.template %}{{ m.status }} · {{ m.template }} v{{ m.template_version }}{% endif %}</td><td><pre>{{ m.content }}</pre></td><td><a href="/trace/{{ m.log_id | url }}">trace</a></td></tr>
{% endfor %}</table>
<h2>Extracted data</h2>
<table id="extracted">{% for name, value in c.extracted %}<tr><th>{{ name }}</th><td>{{ value }}</td></tr>
{% endfor %}</table>
{% include "foot" %}"#;

const TRACE: &str = r#"{% include "head" %}
<h2>Inbound entry</h2>
{% if t.inbound %}<table>{% for k, v in t.inbound.fields %}<tr><th>{{ k }}</th><td><pre>{{ v }}</pre></td></tr>{% endfor %}</table><p>entry {{ t.inbound.id }}</p>
{% else %}<p>Not in the stream (trimmed, or never seen).</p>{% endif %}
<p>Pending: {% if t.pending %}held by {{ t.pending.0 }}, idle {{ t.pending.1 }} ms, {{ t.pending.2 }} deliveries{% else %}no (acknowledged, or never delivered){% endif %}</p>
<h2>Stored messages</h2>
<table id="messages"><tr><th>role</th><th>stage</th><th>status</th><th>template</th><th>content</th><th>timings (ms)</th><th>ids</th></tr>
{% for m in t.messages %}<tr class="{{ m.role }}"><td>{{ m.role }}</td><td>{{ m.stage }}</td><td>{{ m.status }}</td><td>{{ m.template }}{% if m.template_version %} v{{ m.template_version }}{% endif %}</td><td><pre>{{ m.content }}</pre></td><td>{{ m.timings }}</td><td>log {{ m.log_id }}<br>message {{ m.message_id }}<br><a href="/conversations/{{ m.conversation_id | url }}">conversation</a></td></tr>
{% endfor %}</table>
<h2>LLM calls</h2>
<table id="llm-calls"><tr><th>purpose</th><th>template</th><th>model</th><th>latency</th><th>tokens</th><th>outcome</th></tr>
{% for c in t.llm_calls %}<tr><td>{{ c.purpose }}</td><td>{{ c.template }} v{{ c.template_version }}</td><td>{{ c.model }}</td><td>{{ c.latency_ms }} ms</td><td>{{ c.prompt_tokens }}/{{ c.completion_tokens }}</td><td>{{ c.outcome }}</td></tr>
{% endfor %}</table>
{% for s in t.transitions %}<p>Stage transition: {{ s.0 }} → {{ s.1 }}</p>{% endfor %}
{% if t.extracted %}<p>Extracted from it: {{ t.extracted }}</p>{% endif %}
<h2>Replies</h2>
{% for r in t.replies %}<table class="reply"><caption>reply {{ r.id }}</caption>{% for k, v in r.fields %}<tr><th>{{ k }}</th><td><pre>{{ v }}</pre></td></tr>{% endfor %}</table>
{% endfor %}
{% if t.dead_letters %}<h2>Dead letters</h2>{% endif %}
{% for d in t.dead_letters %}<p><a href="/dlq/{{ d.id | url }}">dead letter {{ d.id }}</a>: {{ d.fields.error_code }}</p>
{% endfor %}
{% include "foot" %}"#;

const LOGIN: &str = r#"{% include "head" %}
{% if failed %}<p class="warn">That token is not right.</p>{% endif %}
<form method="post" action="/login"><label>Token <input type="password" name="token" id="token" autocomplete="current-password"></label> <button type="submit" id="sign-in">Sign in</button></form>
{% include "foot" %}"#;

const ERROR: &str = r#"{% include "head" %}
<p class="warn" id="error">{{ message }}</p>
{% if code %}<p>Error code: <code id="code">{{ code }}</code></p>{% endif %}
{% include "foot" %}"#;

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
            ("head", HEAD),
            ("foot", FOOT),
            ("overview", OVERVIEW),
            ("dlq_list", DLQ_LIST),
            ("dlq_show", DLQ_SHOW),
            ("businesses", BUSINESSES),
            ("conversations", CONVERSATIONS),
            ("conversation", CONVERSATION),
            ("trace", TRACE),
            ("login", LOGIN),
            ("error", ERROR),
        ] {
            engine.add_template(name, source)?;
        }
        Ok(Pages { engine })
    }

    /// Renders page `name` titled `title`: `body`'s fields (an object) plus `title`, `style` and
    /// `chrome` make the context.
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
        ctx.insert("style".into(), STYLE.into());
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
