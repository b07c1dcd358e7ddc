//! Eureka's XML form, written from the JSON form with the convention Eureka's own converters
//! use in both directions: a key `@name` is an attribute, `$` is the element's text, an array
//! is the element repeated, an object is a nested element, a scalar is an element holding its
//! text. Pure; `mapping`'s property tests read the XML back and compare it with the JSON.
//!
//! Keys that are not XML names (Sextant metadata keys may hold `/`) are left out of the XML;
//! the JSON form has them.

use serde_json::Value;

/// The document for `root` (e.g. `applications`) holding `value`.
pub fn to_xml(root: &str, value: &Value) -> String {
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"yes\"?>");
    element(&mut out, root, value);
    out
}

/// Whether `name` can be an XML element or attribute name (the ASCII subset Eureka uses).
pub fn is_xml_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    let Some(first) = bytes.next() else {
        return false;
    };
    (first.is_ascii_alphabetic() || first == b'_')
        && !name.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("xml"))
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

fn element(out: &mut String, name: &str, value: &Value) {
    if !is_xml_name(name) {
        return;
    }
    match value {
        Value::Array(items) => {
            for item in items {
                element(out, name, item);
            }
        }
        Value::Object(o) => {
            out.push('<');
            out.push_str(name);
            for (k, v) in o {
                if let Some(attr) = k.strip_prefix('@') {
                    if is_xml_name(attr) {
                        out.push(' ');
                        out.push_str(attr);
                        out.push_str("=\"");
                        escape(out, &scalar(v));
                        out.push('"');
                    }
                }
            }
            out.push('>');
            if let Some(text) = o.get("$") {
                escape(out, &scalar(text));
            }
            for (k, v) in o {
                if !k.starts_with('@') && k != "$" {
                    element(out, k, v);
                }
            }
            close(out, name);
        }
        Value::Null => {
            out.push('<');
            out.push_str(name);
            out.push_str("/>");
        }
        scalar_value => {
            out.push('<');
            out.push_str(name);
            out.push('>');
            escape(out, &scalar(scalar_value));
            close(out, name);
        }
    }
}

fn close(out: &mut String, name: &str) {
    out.push_str("</");
    out.push_str(name);
    out.push('>');
}

/// The text of a scalar (a nested structure, which Eureka never puts in text, as JSON).
pub fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn escape(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Characters XML 1.0 cannot carry at all are dropped.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => {}
            c => out.push(c),
        }
    }
}
