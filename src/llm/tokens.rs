//! Token counts of prompt text, for bounding the history a template puts in a prompt
//! (`context_tokens`) and for deciding when a conversation's history is summarised.
//!
//! A model whose tokenizer is known is counted with it: OpenAI's models with their BPE
//! (`tiktoken-rs`: `o200k_base` for the GPT-4o, GPT-4.1, o1/o3/o4 families, `cl100k_base` for
//! GPT-4 and GPT-3.5). Any other model is estimated at one token per four bytes of UTF-8,
//! rounded up (OpenAI's rule of thumb; measured against SmolLM2's own counts in
//! docs/performance.md). Every turn also costs [`TURN_OVERHEAD`] tokens for its role markup, as
//! chat templates add it.

use tiktoken_rs::CoreBPE;
use tiktoken_rs::tokenizer::{Tokenizer, get_tokenizer};

/// Tokens a chat template adds around one turn (role and separators).
pub const TURN_OVERHEAD: usize = 4;

/// How a model's text is counted.
#[derive(Clone, Copy)]
pub enum Counter {
    /// The model's own tokenizer.
    Bpe(&'static CoreBPE),
    /// Four bytes per token.
    Estimate,
}

impl std::fmt::Debug for Counter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Counter::Bpe(_) => "Counter::Bpe",
            Counter::Estimate => "Counter::Estimate",
        })
    }
}

impl Counter {
    /// The counter of `model`: its tokenizer when known, else the estimate.
    pub fn for_model(model: &str) -> Counter {
        match get_tokenizer(model) {
            Some(t @ (Tokenizer::O200kBase | Tokenizer::Cl100kBase)) => {
                tiktoken_rs::bpe_for_tokenizer(t).map_or(Counter::Estimate, Counter::Bpe)
            }
            _ => Counter::Estimate,
        }
    }

    /// The tokens of `text`.
    pub fn count(&self, text: &str) -> usize {
        match self {
            Counter::Bpe(bpe) => bpe.count_ordinary(text),
            Counter::Estimate => text.len().div_ceil(4),
        }
    }

    /// The tokens of one turn of history: its text and its markup.
    pub fn turn(&self, content: &str) -> usize {
        self.count(content) + TURN_OVERHEAD
    }

    /// Whether this counter is a real tokenizer.
    pub fn is_exact(&self) -> bool {
        matches!(self, Counter::Bpe(_))
    }
}

/// How many of `turns` (oldest first) fit in `budget` tokens, counted from the newest: the
/// newest turns that fit are kept, and a turn that does not fit ends the count (no older turn is
/// taken past it, so the history stays contiguous).
pub fn newest_fitting<'a>(
    counter: &Counter,
    turns: impl DoubleEndedIterator<Item = &'a str>,
    budget: usize,
) -> usize {
    let mut used = 0usize;
    let mut kept = 0usize;
    for content in turns.rev() {
        used += counter.turn(content);
        if used > budget {
            break;
        }
        kept += 1;
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_models_are_counted_with_their_tokenizer_and_others_estimated() {
        let gpt4o = Counter::for_model("gpt-4o-mini");
        assert!(gpt4o.is_exact());
        assert_eq!(gpt4o.count("hello world"), 2);
        let gpt4 = Counter::for_model("gpt-4");
        assert!(gpt4.is_exact());
        assert_eq!(gpt4.count("hello world"), 2);
        let other = Counter::for_model("smollm2");
        assert!(!other.is_exact());
        assert_eq!(other.count("hello world"), 3, "11 bytes / 4, rounded up");
        assert_eq!(other.count(""), 0);
        assert_eq!(other.turn("abcd"), 1 + TURN_OVERHEAD);
    }

    #[test]
    fn the_newest_turns_that_fit_are_kept_and_the_first_that_does_not_ends_the_count() {
        let c = Counter::Estimate;
        // Oldest first: 8 + 4 = 12, 40 + 4 = 44 and 4 + 4 = 8 tokens.
        let turns = ["x".repeat(32), "y".repeat(160), "z".repeat(16)];
        let texts = || turns.iter().map(String::as_str);
        assert_eq!(newest_fitting(&c, texts(), 1000), 3);
        assert_eq!(newest_fitting(&c, texts(), 60), 2);
        assert_eq!(newest_fitting(&c, texts(), 51), 1, "the long turn ends it");
        assert_eq!(newest_fitting(&c, texts(), 7), 0);
    }
}
