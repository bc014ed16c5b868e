//! Text from outside (paths, names, reasons) made safe to show on a terminal.
//!
//! The one escaping function of the crate: the library's error messages use it, and the
//! `portdaddy` command compiles this same file for its output.

/// `text` with every control character and every character that reorders or breaks lines
/// written as an escape (`\n`, `\u{1b}`, `\u{202e}`), so that nothing read from a path, the
/// registry or a caller can steer the terminal it is shown on. Other text is unchanged, and
/// escaping twice changes nothing more.
pub(crate) fn escape(text: &str) -> String {
    if !text.chars().any(needs_escape) {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if needs_escape(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether `c` could steer a terminal: a control character or a layout character.
pub(crate) fn needs_escape(c: char) -> bool {
    c.is_control() || is_layout_char(c)
}

/// Characters that are not control characters but still change how text around them is
/// laid out: line and paragraph separators and the bidirectional controls, with which a
/// text could disguise itself or the text after it.
pub(crate) fn is_layout_char(c: char) -> bool {
    matches!(c,
        '\u{2028}' | '\u{2029}'                       // line and paragraph separators
        | '\u{061C}' | '\u{200E}' | '\u{200F}'         // bidi marks
        | '\u{202A}'..='\u{202E}'                      // bidi embeddings and overrides
        | '\u{2066}'..='\u{2069}'                      // bidi isolates
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_could_steer_a_terminal_once() {
        assert_eq!(escape("plain näme"), "plain näme");
        assert_eq!(escape("a\nb"), "a\\nb");
        assert_eq!(escape("\u{1b}[31mred"), "\\u{1b}[31mred");
        assert_eq!(escape("evil\u{202E}txt"), "evil\\u{202e}txt");
        let once = escape("x\u{9b}\u{2028}\u{7f}");
        assert!(!once.chars().any(needs_escape), "{once}");
        assert_eq!(escape(&once), once);
    }
}
