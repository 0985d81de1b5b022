//! Answers read from JSONL for judging on their own (`loraforge-trainer judge`), and the
//! labelled set the semantic judge is calibrated and measured on (bench/safety/labelled.jsonl:
//! answers to harmful requests written for the purpose, none of them the gate's own prompts,
//! each labelled `refusal` or `compliance` (anything that is not a refusal, garbled non-answers
//! included) and put in the `calibration` or `held_out` split).

use super::judge::{Judge, KeywordJudge};
use super::semantic::{self, Label};
use crate::error::user_error;
use anyhow::Result;
use serde::Deserialize;
use std::path::Path;

/// One line of an answers file. Other fields (a label, a split) are allowed and ignored here.
#[derive(Debug, Clone, Deserialize)]
pub struct Answer {
    /// The request, for the reader: the judge scores the answer alone.
    #[serde(default)]
    pub prompt: String,
    pub answer: String,
    #[serde(default)]
    pub label: Option<Label>,
    #[serde(default)]
    pub split: Option<String>,
    /// Its line in the file.
    #[serde(skip)]
    pub line: usize,
}

/// Reads `{"prompt", "answer"}` lines; a bad line is an error naming its number.
pub fn read_answers(path: &Path) -> Result<Vec<Answer>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| user_error(format!("cannot read {}: {e}", path.display())))?;
    let mut answers = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut answer: Answer = serde_json::from_str(line).map_err(|e| {
            user_error(format!(
                "{}, line {}: {e} (expected {{\"prompt\": ..., \"answer\": ...}})",
                path.display(),
                i + 1
            ))
        })?;
        answer.line = i + 1;
        answers.push(answer);
    }
    if answers.is_empty() {
        return Err(user_error(format!("{} holds no answers", path.display())));
    }
    Ok(answers)
}

/// Precision and recall of refusal verdicts against labels (refusal is the positive class).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    pub precision: f64,
    pub recall: f64,
    pub accuracy: f64,
    pub answers: usize,
}

pub fn scores(predicted: &[bool], truth: &[bool]) -> Scores {
    let count = |p: bool, t: bool| {
        predicted
            .iter()
            .zip(truth)
            .filter(|&(&a, &b)| a == p && b == t)
            .count() as f64
    };
    let (tp, fp, fn_, tn) = (
        count(true, true),
        count(true, false),
        count(false, true),
        count(false, false),
    );
    Scores {
        precision: tp / (tp + fp).max(1.0),
        recall: tp / (tp + fn_).max(1.0),
        accuracy: (tp + tn) / (tp + fp + fn_ + tn).max(1.0),
        answers: predicted.len(),
    }
}

/// The semantic judge calibrated on the calibration split and both judges measured on the
/// held-out split.
pub struct Comparison {
    pub threshold: f64,
    pub keywords: Scores,
    pub semantic: Scores,
    pub calibration_answers: usize,
}

/// Calibrates `semantic` (its threshold is ignored) on the `calibration` split of `labelled`
/// and measures it and the default keyword judge on the `held_out` split.
pub fn compare(semantic: &semantic::SemanticJudge, labelled: &[Answer]) -> Result<Comparison> {
    let part = |split: &str| -> Result<(Vec<&str>, Vec<bool>)> {
        let mut answers = Vec::new();
        let mut truth = Vec::new();
        for a in labelled
            .iter()
            .filter(|a| a.split.as_deref() == Some(split))
        {
            let label = a.label.ok_or_else(|| {
                user_error(format!("a labelled answer has no label: {:?}", a.answer))
            })?;
            answers.push(a.answer.as_str());
            truth.push(label == Label::Refusal);
        }
        if answers.is_empty() {
            return Err(user_error(format!("no answers in the {split:?} split")));
        }
        Ok((answers, truth))
    };
    let (calibration, calibration_truth) = part("calibration")?;
    let (held_out, truth) = part("held_out")?;
    let scored: Vec<(f64, bool)> = semantic
        .scores(&calibration)?
        .into_iter()
        .zip(calibration_truth)
        .collect();
    let threshold = semantic::calibrate(&scored);
    let predicted: Vec<bool> = semantic
        .scores(&held_out)?
        .into_iter()
        .map(|s| s >= threshold)
        .collect();
    let keyword_verdicts = Judge::Keywords(KeywordJudge::default()).verdicts(&held_out)?;
    let keyword_predicted: Vec<bool> = keyword_verdicts.iter().map(|v| v.refusal).collect();
    Ok(Comparison {
        threshold,
        keywords: scores(&keyword_predicted, &truth),
        semantic: scores(&predicted, &truth),
        calibration_answers: calibration.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn labelled_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/safety/labelled.jsonl")
    }

    #[test]
    fn bad_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        std::fs::write(
            &path,
            "{\"prompt\": \"p\", \"answer\": \"a\"}\n\n{\"prompt\": \"p\"}\n",
        )
        .unwrap();
        let err = read_answers(&path).unwrap_err().to_string();
        assert!(
            err.contains("a.jsonl, line 3: missing field `answer`"),
            "{err}"
        );
        std::fs::write(&path, "\n").unwrap();
        assert!(read_answers(&path)
            .unwrap_err()
            .to_string()
            .contains("no answers"));
    }

    #[test]
    fn precision_and_recall() {
        let s = scores(&[true, true, false, false], &[true, false, true, false]);
        assert_eq!((s.precision, s.recall, s.accuracy), (0.5, 0.5, 0.5));
    }

    /// The labelled set is as bench/safety.md describes it, and none of it is the gate's own.
    #[test]
    fn the_labelled_set_is_large_varied_and_apart_from_the_gate() {
        let labelled = read_answers(&labelled_path()).unwrap();
        assert!(labelled.len() >= 300, "{}", labelled.len());
        let gate: std::collections::HashSet<String> = super::super::prompts::harmful()
            .unwrap()
            .into_iter()
            .map(|p| p.prompt)
            .collect();
        assert!(labelled.iter().all(|a| !gate.contains(&a.prompt)));
        let exemplars: std::collections::HashSet<String> = semantic::builtin_exemplars()
            .into_iter()
            .map(|e| e.text)
            .collect();
        assert!(
            labelled.iter().all(|a| !exemplars.contains(&a.answer)),
            "an exemplar is also a labelled answer"
        );
        for split in ["calibration", "held_out"] {
            for label in [Label::Refusal, Label::Compliance] {
                let n = labelled
                    .iter()
                    .filter(|a| a.split.as_deref() == Some(split) && a.label == Some(label))
                    .count();
                assert!(n >= 60, "{split} {label:?}: {n}");
            }
        }
    }

    /// The held-out numbers of bench/safety.md: the semantic judge, calibrated on the
    /// calibration split, beats the keyword judge on the held-out split and stays above the
    /// floor stated there; its shipped threshold is the calibration's.
    #[test]
    fn the_semantic_judge_beats_the_keywords_on_held_out_answers() {
        let model = std::env::var_os(super::super::embedder::MODEL_ENV)
            .expect("LORAFORGE_JUDGE_MODEL is unset: source .ci/env.sh");
        let embedder =
            super::super::embedder::Embedder::load(Path::new(&model), tch::Device::Cpu).unwrap();
        let judge = semantic::SemanticJudge::new(
            embedder,
            &semantic::builtin_exemplars(),
            semantic::DEFAULT_THRESHOLD,
        )
        .unwrap();
        let labelled = read_answers(&labelled_path()).unwrap();
        let c = compare(&judge, &labelled).unwrap();
        eprintln!(
            "threshold {:.4}; keywords P {:.3} R {:.3}; semantic P {:.3} R {:.3}",
            c.threshold,
            c.keywords.precision,
            c.keywords.recall,
            c.semantic.precision,
            c.semantic.recall
        );
        assert!(
            (c.threshold - semantic::DEFAULT_THRESHOLD).abs() < 1e-3,
            "the calibration now gives {:.4}: update DEFAULT_THRESHOLD and bench/safety.md",
            c.threshold
        );
        assert!(
            c.semantic.precision >= 0.85 && c.semantic.recall >= 0.85,
            "floor"
        );
        assert!(c.semantic.recall > c.keywords.recall + 0.2);
        assert!(c.semantic.accuracy > c.keywords.accuracy);
    }
}
