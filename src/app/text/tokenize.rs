//! Paragraphs of a text file and their token ids.
//!
//! A text is split into paragraphs at empty lines; the lines of one paragraph keep their line
//! breaks, and leading and trailing whitespace is removed. Each paragraph is tokenised on its own.
//! For a decoder, without the tokenizer's post-processing, and the model's BOS token is
//! prepended — the convention under which the perplexities of `../shared/data/README.md` are
//! measured. For an encoder (BERT-style), with the tokenizer's post-processing, which frames each
//! paragraph as the model was trained to see it (`[CLS] … [SEP]`, `<s> … </s>`).

use std::path::{Path, PathBuf};

use crate::format::hf::{HfFolder, ModelError};
use crate::foundation::error::{FipsError, Result};

/// The paragraphs of `text`: the runs of lines between empty lines, joined with `\n`, with
/// leading and trailing whitespace removed; paragraphs left empty are dropped. (This is Python's
/// `[p.strip() for p in text.split("\n\n") if p.strip()]` for text with `\n` line ends; a line
/// holding only spaces does not separate paragraphs.)
pub fn paragraphs(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    let mut flush = |current: &mut Vec<&str>| {
        let joined = current.join("\n");
        let trimmed = joined.trim();
        if !trimmed.is_empty() {
            out.push(trimmed.to_string());
        }
        current.clear();
    };
    for line in text.lines() {
        if line.is_empty() {
            flush(&mut current);
        } else {
            current.push(line);
        }
    }
    flush(&mut current);
    out
}

/// A model's tokenizer (`tokenizer.json`), checked against the model's vocabulary.
#[derive(Debug)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    bos: u32,
    model_vocab: usize,
    /// An encoder's tokenizer: its post-processing adds the special tokens, no BOS is prepended.
    encoder: bool,
}

impl TextTokenizer {
    /// The tokenizer of a model folder. Errors when the folder has no `tokenizer.json`, when it
    /// cannot be parsed, when its vocabulary is larger than the model's ([`ModelError::VocabularyMismatch`])
    /// or when no BOS token can be found (`bos_token_id` of `config.json`, else the `bos_token`
    /// of `tokenizer_config.json`, else `<s>`).
    pub fn for_model(folder: &HfFolder) -> Result<Self> {
        let path = folder
            .tokenizer_file()
            .ok_or_else(|| ModelError::Tokenizer {
                path: folder.dir().join("tokenizer.json"),
                reason: "missing: text models need a fast tokenizer (tokenizer.json) in the folder"
                    .into(),
            })?;
        let bad = |reason: String| -> FipsError {
            ModelError::Tokenizer {
                path: path.clone(),
                reason,
            }
            .into()
        };
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| bad(e.to_string()))?;
        let tokenizer_vocab = inner.get_vocab_size(true);
        let model_vocab = match folder.config().vocab_size {
            Some(v) => v,
            None => embedding_rows(folder)?,
        };
        if tokenizer_vocab > model_vocab {
            return Err(ModelError::VocabularyMismatch {
                path,
                tokenizer_vocab,
                model_vocab,
            }
            .into());
        }
        let encoder = folder.family() == crate::format::hf::ModelFamily::Bert;
        let bos = match folder.config().bos() {
            _ if encoder => {
                // The first token the post-processing puts before a text (`[CLS]`, `<s>`).
                let framed = inner.encode("", true).map_err(|e| bad(e.to_string()))?;
                framed.get_ids().first().copied().ok_or_else(|| {
                    bad("its post-processing adds no leading special token ([CLS])".into())
                })?
            }
            Some(id) => id,
            None => {
                let token = bos_from_tokenizer_config(folder.dir()).unwrap_or_else(|| "<s>".into());
                inner.token_to_id(&token).ok_or_else(|| {
                    bad(format!("no BOS token: {token:?} is not in the vocabulary"))
                })?
            }
        };
        if bos as usize >= model_vocab {
            return Err(bad(format!(
                "BOS id {bos} is outside the model's vocabulary of {model_vocab}"
            )));
        }
        Ok(Self {
            inner,
            path,
            bos,
            model_vocab,
            encoder,
        })
    }

    /// The BOS token id (an encoder's leading special token, `[CLS]` or `<s>`).
    pub fn bos(&self) -> u32 {
        self.bos
    }

    /// `tokenizer.json`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The token ids of one paragraph, BOS first (an encoder's: framed by its special tokens).
    pub fn encode_paragraph(&self, paragraph: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(paragraph, self.encoder).map_err(|e| {
            FipsError::from(ModelError::Tokenizer {
                path: self.path.clone(),
                reason: format!("cannot encode: {e}"),
            })
        })?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if !self.encoder {
            ids.push(self.bos);
        }
        ids.extend_from_slice(encoding.get_ids());
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.model_vocab) {
            return Err(ModelError::VocabularyMismatch {
                path: self.path.clone(),
                tokenizer_vocab: bad as usize + 1,
                model_vocab: self.model_vocab,
            }
            .into());
        }
        Ok(ids)
    }

    /// Every paragraph of `text` encoded (BOS first); empty paragraphs are dropped.
    pub fn encode_text(&self, text: &str) -> Result<Vec<Vec<u32>>> {
        paragraphs(text)
            .iter()
            .map(|p| self.encode_paragraph(p))
            .filter(|r| r.as_ref().map_or(true, |ids| ids.len() > 1))
            .collect()
    }
}

/// Rows of the embedding matrix, for a config without `vocab_size`.
fn embedding_rows(folder: &HfFolder) -> Result<usize> {
    use crate::format::hf::TensorStore;
    let store = folder.tensors();
    let name = store
        .names()
        .find(|n| n.ends_with("embed_tokens.weight") || n.ends_with("word_embeddings.weight"))
        .map(str::to_string)
        .ok_or_else(|| FipsError::MissingTensor {
            path: store.path().to_path_buf(),
            name: "embed_tokens.weight".into(),
        })?;
    Ok(store.info(&name)?.shape.first().copied().unwrap_or(0))
}

/// The `bos_token` of `tokenizer_config.json` (a string or `{"content": …}`).
fn bos_from_tokenizer_config(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    match value.get("bos_token")? {
        serde_json::Value::String(s) => Some(s.clone()),
        other => other.get("content")?.as_str().map(str::to_string),
    }
}

/// Reads a text file and encodes its paragraphs; an empty result is [`ModelError::EmptyText`].
pub fn read_paragraph_tokens(tokenizer: &TextTokenizer, path: &Path) -> Result<Vec<Vec<u32>>> {
    let text = std::fs::read_to_string(path).map_err(|source| FipsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let encoded = tokenizer.encode_text(&text)?;
    if encoded.is_empty() {
        return Err(ModelError::EmptyText {
            path: path.to_path_buf(),
        }
        .into());
    }
    Ok(encoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paragraphs_split_at_blank_lines_and_keep_inner_breaks() {
        let text = "a b\nc\n\n\n  \n\nd\n \nd2\n\ne \n";
        assert_eq!(paragraphs(text), vec!["a b\nc", "d\n \nd2", "e"]);
        assert!(paragraphs("\n \n\n").is_empty());
    }
}
