//! Gathers a stream's deltas into one whole answer, for the front doors'
//! unary calls. What an upstream can make it hold is bounded.

use crate::chat::{Delta, Finish, ToolCall};

/// Most tool calls kept from one answer; an upstream cannot make us
/// allocate without bound through a large index.
const MAX_TOOL_CALLS: usize = 256;

/// A whole answer.
#[derive(Debug, Default)]
pub struct Answer {
    /// The upstream's response id, or the call's request id.
    pub id: String,
    pub content: String,
    /// The model's reasoning text, apart from `content`.
    pub reasoning: String,
    pub tool_calls: Vec<ToolCall>,
    pub finish: Finish,
    /// USD of `finish.usage`, from `prices`.
    pub cost_usd: f64,
}

#[derive(Default)]
pub(super) struct Collector {
    id: Option<String>,
    content: String,
    reasoning: String,
    tool_calls: Vec<ToolCall>,
    pub(super) finish: Option<Finish>,
}

impl Collector {
    /// Bytes gathered so far.
    pub(super) fn size(&self) -> usize {
        self.content.len()
            + self.reasoning.len()
            + self.tool_calls.iter().map(|c| c.arguments_json.len()).sum::<usize>()
    }

    pub(super) fn push(&mut self, d: Delta) {
        if self.id.is_none() {
            self.id = d.id;
        }
        if self.content.is_empty() {
            self.content = d.content;
        } else {
            self.content.push_str(&d.content);
        }
        if self.reasoning.is_empty() {
            self.reasoning = d.reasoning;
        } else {
            self.reasoning.push_str(&d.reasoning);
        }
        for c in d.tool_calls {
            let i = c.index as usize;
            if i >= MAX_TOOL_CALLS {
                continue;
            }
            while self.tool_calls.len() <= i {
                self.tool_calls.push(ToolCall {
                    id: String::new(),
                    name: String::new(),
                    arguments_json: String::new(),
                });
            }
            let call = &mut self.tool_calls[i];
            if !c.id.is_empty() {
                call.id = c.id;
            }
            if !c.name.is_empty() {
                call.name = c.name;
            }
            call.arguments_json.push_str(&c.arguments_delta);
        }
        if d.finish.is_some() {
            self.finish = d.finish;
        }
    }

    /// The answer; `request_id` stands in for an id the upstream never gave.
    pub(super) fn answer(self, request_id: &str) -> Answer {
        Answer {
            id: self.id.unwrap_or_else(|| request_id.to_owned()),
            content: self.content,
            reasoning: self.reasoning,
            // Indices an upstream skipped leave empty slots behind.
            tool_calls: self
                .tool_calls
                .into_iter()
                .filter(|t| !t.name.is_empty() || !t.id.is_empty())
                .collect(),
            finish: self.finish.unwrap_or_default(),
            cost_usd: 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::ToolCallDelta;

    #[test]
    fn collects_tool_calls() {
        let mut c = Collector::default();
        c.push(Delta {
            tool_calls: vec![ToolCallDelta {
                index: 0,
                id: "a".into(),
                name: "f".into(),
                arguments_delta: "{\"x\"".into(),
            }],
            ..Default::default()
        });
        c.push(Delta {
            tool_calls: vec![
                ToolCallDelta { index: 0, arguments_delta: ":1}".into(), ..Default::default() },
                ToolCallDelta { index: 2, id: "b".into(), name: "g".into(), ..Default::default() },
            ],
            ..Default::default()
        });
        let answer = c.answer("req");
        assert_eq!(answer.id, "req");
        assert_eq!(answer.tool_calls.len(), 2, "the skipped index leaves no empty call");
        assert_eq!(answer.tool_calls[0].arguments_json, "{\"x\":1}");
        assert_eq!(answer.tool_calls[0].name, "f");
        assert_eq!(answer.tool_calls[1].name, "g");
    }
}
