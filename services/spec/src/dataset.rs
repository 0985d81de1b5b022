//! The dataset formats: what one JSONL line may be, read the same way by the trainer (which
//! tokenizes it) and the control plane (which checks an upload line by line before storing it).
//! A line is one of three formats; a file may mix them, since each line's keys say which it is:
//! - chat `{"messages": [{"role", "content"}, ...], "tools": [...]?}`; loss on the assistant
//!   turns (role `assistant`) only;
//! - `{"prompt", "completion"}`; loss on the completion only;
//! - `{"text"}`; loss on all of it.
//!
//! Other keys are ignored, so exported datasets carrying ids or metadata load as they are.

use crate::error::FieldError;
use serde::de::DeserializeOwned;
use serde::Deserialize;

/// Which of the three formats a line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Chat,
    PromptCompletion,
    Text,
}

impl Format {
    pub const ALL: [Format; 3] = [Format::Chat, Format::PromptCompletion, Format::Text];

    /// How a message names it: `chat ("messages")`.
    pub fn describe(self) -> &'static str {
        match self {
            Format::Chat => "chat (\"messages\")",
            Format::PromptCompletion => "prompt-completion (\"prompt\", \"completion\")",
            Format::Text => "text (\"text\")",
        }
    }

    /// What an example of this format is learned from, for messages about examples with
    /// nothing to learn.
    pub fn learned_from(self) -> &'static str {
        match self {
            Format::Chat => "chat examples are learned from their assistant turns only (messages with role \"assistant\")",
            Format::PromptCompletion => "prompt-completion examples are learned from the completion (and the end-of-text token) only",
            Format::Text => "text examples are learned from all of their text",
        }
    }
}

/// One line, parsed. `M` is how a chat message is held: the trainer keeps its template
/// engine's values, the control plane plain JSON.
#[derive(Debug, Clone, PartialEq)]
pub enum Example<M> {
    Chat { messages: Vec<M>, tools: Option<M> },
    PromptCompletion { prompt: String, completion: String },
    Text(String),
}

impl<M> Example<M> {
    pub fn format(&self) -> Format {
        match self {
            Example::Chat { .. } => Format::Chat,
            Example::PromptCompletion { .. } => Format::PromptCompletion,
            Example::Text(_) => Format::Text,
        }
    }
}

/// One JSONL line; which fields are set decides its format.
#[derive(Deserialize)]
#[serde(bound(deserialize = "M: DeserializeOwned"))]
struct Record<M> {
    #[serde(default)]
    messages: Option<Vec<M>>,
    #[serde(default)]
    tools: Option<M>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    completion: Option<String>,
    #[serde(default)]
    text: Option<String>,
}

/// Parses one line (without its newline). `has_role` says whether a message has a `role`
/// string. The error says what is wrong with the line, without naming it.
pub fn parse_example<M: DeserializeOwned>(
    line: &str,
    has_role: impl Fn(&M) -> bool,
) -> Result<Example<M>, String> {
    // serde would read a JSON array positionally into the record's fields.
    if !line.trim_start().starts_with('{') {
        let hint = if line.starts_with('\u{feff}') {
            " (the file starts with a byte-order mark; save it as UTF-8 without one)"
        } else {
            ""
        };
        return Err(format!(
            "expected a JSON object with \"messages\", \"prompt\" and \"completion\", or \"text\"{hint}"
        ));
    }
    let record: Record<M> = serde_json::from_str(line).map_err(|e| {
        // serde_json's message ends with its own position ("at line 1 column 9"); ours says which line.
        let detail = e.to_string();
        let detail = detail
            .rsplit_once(" at line ")
            .map_or(detail.as_str(), |(text, _)| text);
        format!("column {}: {detail}", e.column())
    })?;
    let formats = [
        record.messages.is_some(),
        record.prompt.is_some() || record.completion.is_some(),
        record.text.is_some(),
    ];
    if formats.iter().filter(|&&present| present).count() > 1 {
        return Err(
            "has the keys of more than one format; use one of \"messages\", \"prompt\"/\"completion\" or \"text\""
                .into(),
        );
    }
    match record {
        Record {
            messages: Some(messages),
            tools,
            ..
        } => {
            if messages.is_empty() {
                return Err("\"messages\" is empty".into());
            }
            if let Some(i) = messages.iter().position(|m| !has_role(m)) {
                return Err(format!("message {} has no \"role\" string", i + 1));
            }
            Ok(Example::Chat { messages, tools })
        }
        Record {
            prompt: Some(prompt),
            completion: Some(completion),
            ..
        } => Ok(Example::PromptCompletion { prompt, completion }),
        Record {
            prompt: Some(_), ..
        } => Err("has \"prompt\" but no \"completion\"".into()),
        Record {
            completion: Some(_),
            ..
        } => Err("has \"completion\" but no \"prompt\"".into()),
        Record {
            text: Some(text), ..
        } => Ok(Example::Text(text)),
        _ => Err("expected \"messages\", \"prompt\" and \"completion\", or \"text\"".into()),
    }
}

/// How many examples of each format, in [`Format::ALL`]'s order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FormatCounts(pub [u64; 3]);

impl FormatCounts {
    pub fn add(&mut self, format: Format) {
        self.0[format as usize] += 1;
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// `chat ("messages") for all 12 examples`, or `5 chat ("messages"), 2 text ("text")`.
    pub fn describe(&self) -> String {
        let present: Vec<(Format, u64)> = Format::ALL
            .into_iter()
            .zip(self.0)
            .filter(|&(_, n)| n > 0)
            .collect();
        match present.as_slice() {
            [] => "no format (no examples)".into(),
            [(format, n)] => format!(
                "{} for all {n} example{}",
                format.describe(),
                if *n == 1 { "" } else { "s" }
            ),
            many => many
                .iter()
                .map(|(format, n)| format!("{n} {}", format.describe()))
                .collect::<Vec<_>>()
                .join(", "),
        }
    }

    /// What each format present is learned from, one sentence each.
    pub fn learned_from(&self) -> String {
        Format::ALL
            .into_iter()
            .zip(self.0)
            .filter(|&(_, n)| n > 0)
            .map(|(format, _)| format.learned_from())
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Most line errors one check reports; it stops reading after that many.
pub const MAX_REPORTED_ERRORS: usize = 20;
/// Longest line accepted (a chat of some hundred thousand tokens fits many times over).
pub const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

/// What a checked file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetSummary {
    pub examples: u64,
    pub formats: FormatCounts,
}

/// Checks a JSONL dataset fed in chunks of any size, line by line, as the trainer would read
/// it: blank lines are skipped, every other line must be UTF-8 and one of the formats. What
/// cannot be known without the model's tokenizer (whether a chat renders with its template,
/// truncation) is left to the job; what can (a file where no example has anything to learn:
/// chats without an assistant turn) is refused here.
#[derive(Debug, Default)]
pub struct LineChecker {
    /// The current line so far (bounded by [`MAX_LINE_BYTES`]).
    partial: Vec<u8>,
    /// Bytes of the current line dropped because it is too long (0: none).
    overflow: usize,
    line: u64,
    formats: FormatCounts,
    /// Examples with something to learn, as far as their structure tells.
    learnable: u64,
    errors: Vec<FieldError>,
}

impl LineChecker {
    pub fn new() -> LineChecker {
        LineChecker::default()
    }

    /// Reads a chunk; lines may span chunks.
    pub fn feed(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() && !self.is_full() {
            match chunk.iter().position(|&b| b == b'\n') {
                Some(end) => {
                    self.append(&chunk[..end]);
                    self.end_line();
                    chunk = &chunk[end + 1..];
                }
                None => {
                    self.append(chunk);
                    return;
                }
            }
        }
    }

    /// Whether enough errors were found to refuse the file: reading more cannot change that.
    pub fn is_full(&self) -> bool {
        self.errors.len() >= MAX_REPORTED_ERRORS
    }

    /// The verdict once every chunk is fed: the summary, or the first errors, each naming its
    /// line (`line`) with `field` set to `field`.
    pub fn finish(mut self, field: &str) -> Result<DatasetSummary, Vec<FieldError>> {
        if (!self.partial.is_empty() || self.overflow > 0) && !self.is_full() {
            self.end_line();
        }
        let examples = self.formats.total();
        if self.errors.is_empty() && examples == 0 {
            self.errors.push(FieldError::new(
                "",
                "has no examples: expected one JSON object per line with \"messages\", \"prompt\" and \"completion\", or \"text\"",
            ));
        } else if self.errors.is_empty() && self.learnable == 0 {
            self.errors.push(FieldError::new(
                "",
                format!(
                    "has nothing to train on: read as {}, and none has an assistant turn; {}",
                    self.formats.describe(),
                    self.formats.learned_from()
                ),
            ));
        }
        if self.errors.is_empty() {
            return Ok(DatasetSummary {
                examples,
                formats: self.formats,
            });
        }
        for e in &mut self.errors {
            e.field = field.to_string();
        }
        Err(self.errors)
    }

    fn append(&mut self, bytes: &[u8]) {
        if self.overflow > 0 || self.partial.len() + bytes.len() > MAX_LINE_BYTES {
            self.overflow += bytes.len();
        } else {
            self.partial.extend_from_slice(bytes);
        }
    }

    fn end_line(&mut self) {
        self.line += 1;
        let line = self.line;
        let bytes = std::mem::take(&mut self.partial);
        if std::mem::take(&mut self.overflow) > 0 {
            self.error(
                line,
                format!("is longer than {} MiB", MAX_LINE_BYTES / (1024 * 1024)),
            );
            return;
        }
        let text = match std::str::from_utf8(&bytes) {
            Ok(text) => text,
            Err(e) => return self.error(line, format!("not UTF-8 text: {e}")),
        };
        // A CRLF file reads as the trainer reads it: serde skips the trailing `\r`.
        if text.trim().is_empty() {
            return;
        }
        match parse_example::<serde_json::Value>(text, |m| {
            m.get("role").is_some_and(serde_json::Value::is_string)
        }) {
            Ok(example) => {
                self.formats.add(example.format());
                let learnable = match &example {
                    Example::Chat { messages, .. } => messages
                        .iter()
                        .any(|m| m.get("role").and_then(|r| r.as_str()) == Some("assistant")),
                    Example::PromptCompletion { .. } | Example::Text(_) => true,
                };
                self.learnable += u64::from(learnable);
            }
            Err(message) => self.error(line, message),
        }
    }

    fn error(&mut self, line: u64, message: String) {
        self.errors
            .push(FieldError::new("", format!("line {line}: {message}")).at_line(line));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(chunks: &[&[u8]]) -> Result<DatasetSummary, Vec<FieldError>> {
        let mut checker = LineChecker::new();
        for chunk in chunks {
            checker.feed(chunk);
        }
        checker.finish("body")
    }

    #[test]
    fn the_three_formats_pass_across_chunk_boundaries() {
        let file = concat!(
            r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}"#,
            "\n\n",
            r#"{"prompt": "2+2=", "completion": "4", "id": 7}"#,
            "\r\n",
            r#"{"text": "the cat sat"}"#
        )
        .as_bytes();
        for split in 0..file.len() {
            let summary = check(&[&file[..split], &file[split..]]).unwrap();
            assert_eq!(summary.examples, 3);
            assert_eq!(summary.formats, FormatCounts([1, 1, 1]));
        }
    }

    #[test]
    fn bad_lines_are_named_by_number() {
        let file = b"{\"text\": \"ok\"}\n[1, 2]\n{\"prompt\": \"p\"}\n{\"text\": \"a\", \"prompt\": \"b\", \"completion\": \"c\"}\n\xff\n{\"messages\": [{\"content\": \"x\"}]}\n{\"text\": ";
        let errors = check(&[file]).unwrap_err();
        let lines: Vec<Option<u64>> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, [2, 3, 4, 5, 6, 7].map(Some));
        assert!(errors.iter().all(|e| e.field == "body"));
        assert!(errors[1]
            .message
            .contains("has \"prompt\" but no \"completion\""));
        assert!(errors[3].message.contains("not UTF-8"));
        assert!(errors[4].message.contains("message 1 has no \"role\""));
        assert!(errors[5].message.starts_with("line 7: column"));
    }

    #[test]
    fn reading_stops_after_enough_errors() {
        let mut checker = LineChecker::new();
        checker.feed("nope\n".repeat(MAX_REPORTED_ERRORS + 5).as_bytes());
        assert!(checker.is_full());
        assert_eq!(
            checker.finish("body").unwrap_err().len(),
            MAX_REPORTED_ERRORS
        );
    }

    #[test]
    fn empty_and_untrainable_files_say_why() {
        let empty = check(&[b"\n  \n"]).unwrap_err();
        assert!(empty[0].message.contains("has no examples"));
        let no_assistant =
            check(&[b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n"]).unwrap_err();
        assert!(
            no_assistant[0]
                .message
                .contains("read as chat (\"messages\") for all 1 example,"),
            "{}",
            no_assistant[0].message
        );
        assert_eq!(no_assistant[0].line, None);
    }

    #[test]
    fn an_overlong_line_is_an_error_not_a_buffer() {
        let mut checker = LineChecker::new();
        let chunk = vec![b'x'; 1024 * 1024];
        for _ in 0..17 {
            checker.feed(&chunk);
        }
        assert!(checker.partial.len() <= MAX_LINE_BYTES);
        checker.feed(b"\n{\"text\": \"fine\"}\n");
        let errors = checker.finish("body").unwrap_err();
        assert_eq!(errors.len(), 1);
        assert!(errors[0].message.contains("longer than 16 MiB"));
    }

    #[test]
    fn counts_describe_themselves() {
        assert_eq!(
            FormatCounts([2, 0, 1]).describe(),
            "2 chat (\"messages\"), 1 text (\"text\")"
        );
    }
}
