//! Business definitions as the pipeline reads them: the business with its stages, a stage's
//! template ids, and compiled templates. Each read goes through three tiers: this process
//! ([`local`]), Redis (`business:{id}`, `stage:{id}`, `tmpl:{id}`, see [`crate::cache`]), then
//! PostgreSQL. The [`live`] watch on PostgreSQL's change notifications drops a changed
//! business's copies in every tier, so the next message uses the new version; how definitions
//! are written (`icmp import`) is [`crate::business`].
//!
//! - [`stages`]: the business and a stage's template ids ([`StageService`]);
//! - [`templates`]: templates, compiled once per version, and rendered ([`TemplateService`]);
//! - [`local`]: the in-process tier, and the generation that keeps a load that a change
//!   overtook from being stored;
//! - [`live`]: the change watch.

pub mod live;
pub mod local;
pub mod stages;
pub mod templates;

pub use stages::StageService;
pub use templates::TemplateService;
