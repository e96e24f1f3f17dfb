//! Free text from users (names, descriptions, reasons): the one rule every stored text
//! follows. NUL cannot be stored by PostgreSQL at all, and the other control characters
//! (terminal escapes, backspaces) have no business in a name shown to other people.

/// Why a text was refused, for the field named by the caller.
pub const CONTROL_CHARACTERS: &str = "must not contain control characters";

/// Whether `text` holds a control character (Unicode category Cc: C0, DEL and C1). With
/// `multiline`, line feeds, carriage returns and tabs are allowed (descriptions).
pub fn has_control_characters(text: &str, multiline: bool) -> bool {
    text.chars().any(|c| c.is_control() && !(multiline && matches!(c, '\n' | '\r' | '\t')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_found() {
        for refused in ["a\0b", "\u{1b}[31mred", "back\u{8}space", "del\u{7f}", "c1\u{85}"] {
            assert!(has_control_characters(refused, true), "{refused:?}");
        }
        assert!(has_control_characters("two\nlines", false));
        assert!(!has_control_characters("two\nlines\tand\r\n", true));
        assert!(!has_control_characters("Zoë's café 🎫 \u{200d}", false), "letters, emoji and joiners are text");
    }
}
