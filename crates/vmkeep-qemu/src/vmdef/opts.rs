//! The value of one QEMU option: `key=value,...` (QemuOpts / keyval, `,,` escapes a comma) or,
//! for the options that take it, a JSON object. Both forms are read and edited through dotted
//! paths (`file.filename`), so code that follows a `-blockdev` chain does not care which form
//! the user wrote. Editing keeps every item it does not touch, in order, as written.

use serde_json::{Map, Value};

/// `key=value` items in order; a bare item (no `=`) has no key: the implied first key
/// (`-device virtio-blk-pci,...`, `-machine pc,...`) or a flag (`server`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyVal {
    items: Vec<(Option<String>, String)>,
}

impl KeyVal {
    /// Parses `a=b,c,d=e,,f` (`,,` is a literal comma). Never fails: odd input gives odd items.
    pub fn parse(s: &str) -> KeyVal {
        let mut items = Vec::new();
        let mut token = String::new();
        let mut chars = s.chars().peekable();
        let mut any = false;
        while let Some(c) = chars.next() {
            any = true;
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    token.push(',');
                    continue;
                }
                items.push(split_item(&token));
                token.clear();
            } else {
                token.push(c);
            }
        }
        if any {
            items.push(split_item(&token));
        }
        KeyVal { items }
    }

    /// The text QEMU parses back into the same items.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (i, (key, value)) in self.items.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            if let Some(k) = key {
                out.push_str(&k.replace(',', ",,"));
                out.push('=');
            }
            out.push_str(&value.replace(',', ",,"));
        }
        out
    }

    /// The first item when it has no key (the implied key's value).
    pub fn implied(&self) -> Option<&str> {
        match self.items.first() {
            Some((None, v)) => Some(v),
            _ => None,
        }
    }

    /// Replaces (or inserts) the bare first item.
    pub fn set_implied(&mut self, value: &str) {
        match self.items.first_mut() {
            Some((None, v)) => *v = value.to_owned(),
            _ => self.items.insert(0, (None, value.to_owned())),
        }
    }

    /// The value of `key` (the last occurrence wins, as in QEMU).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.items
            .iter()
            .rev()
            .find(|(k, _)| k.as_deref() == Some(key))
            .map(|(_, v)| v.as_str())
    }

    /// Whether any key is `prefix.something`.
    pub fn has_children(&self, prefix: &str) -> bool {
        self.items
            .iter()
            .any(|(k, _)| k.as_deref().is_some_and(|k| is_below(k, prefix)))
    }

    /// Sets `key` to `value`: the first occurrence is replaced (later ones removed), or the item
    /// is appended.
    pub fn set(&mut self, key: &str, value: &str) {
        let mut seen = false;
        self.items.retain_mut(|(k, v)| {
            if k.as_deref() != Some(key) {
                return true;
            }
            if seen {
                return false;
            }
            seen = true;
            *v = value.to_owned();
            true
        });
        if !seen {
            self.items.push((Some(key.to_owned()), value.to_owned()));
        }
    }

    /// Removes `key` and every `key.child`.
    pub fn remove(&mut self, key: &str) {
        self.items.retain(|(k, _)| match k {
            Some(k) => k != key && !is_below(k, key),
            None => true,
        });
    }

    /// Keeps the bare items and the keyed items for which `keep(key)` holds.
    pub fn retain_keys(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.items
            .retain(|(k, _)| k.as_deref().is_none_or(&mut keep));
    }

    /// Every value (keyed or bare).
    pub fn values(&self) -> impl Iterator<Item = (Option<&str>, &str)> {
        self.items.iter().map(|(k, v)| (k.as_deref(), v.as_str()))
    }
}

fn split_item(token: &str) -> (Option<String>, String) {
    match token.split_once('=') {
        Some((k, v)) => (Some(k.to_owned()), v.to_owned()),
        None => (None, token.to_owned()),
    }
}

fn is_below(key: &str, prefix: &str) -> bool {
    key.len() > prefix.len() + 1 && key.starts_with(prefix) && key.as_bytes()[prefix.len()] == b'.'
}

/// An option value in either form.
#[derive(Debug, Clone, PartialEq)]
pub enum OptValue {
    KeyVal(KeyVal),
    Json(Map<String, Value>),
}

impl OptValue {
    /// Parses `s`; a value starting with `{` is JSON when `json_allowed` and it parses as an
    /// object (otherwise it is read as key=value, as QEMU would try).
    pub fn parse(s: &str, json_allowed: bool) -> OptValue {
        if json_allowed && s.trim_start().starts_with('{') {
            if let Ok(Value::Object(m)) = serde_json::from_str(s) {
                return OptValue::Json(m);
            }
        }
        OptValue::KeyVal(KeyVal::parse(s))
    }

    pub fn render(&self) -> String {
        match self {
            OptValue::KeyVal(kv) => kv.render(),
            OptValue::Json(m) => Value::Object(m.clone()).to_string(),
        }
    }

    /// The scalar at a dotted path as text (`true`, `12`, `"a"` → `a`); `None` for objects,
    /// nulls and missing keys.
    pub fn get(&self, path: &str) -> Option<String> {
        match self {
            OptValue::KeyVal(kv) => kv.get(path).map(str::to_owned),
            OptValue::Json(m) => match json_at(m, path)? {
                Value::String(s) => Some(s.clone()),
                Value::Bool(b) => Some(b.to_string()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            },
        }
    }

    /// Whether `path` holds a nested object (an inline child such as `file.driver=...`).
    pub fn is_inline(&self, path: &str) -> bool {
        match self {
            OptValue::KeyVal(kv) => kv.has_children(path),
            OptValue::Json(m) => matches!(json_at(m, path), Some(Value::Object(_))),
        }
    }

    /// Whether `path` is present and not null (an empty key=value string means null).
    pub fn is_set(&self, path: &str) -> bool {
        match self {
            OptValue::KeyVal(kv) => {
                kv.get(path).is_some_and(|v| !v.is_empty()) || kv.has_children(path)
            }
            OptValue::Json(m) => !matches!(json_at(m, path), None | Some(Value::Null)),
        }
    }

    /// Sets a string at a dotted path (creating JSON objects on the way; a scalar in the way
    /// is replaced).
    pub fn set(&mut self, path: &str, value: &str) {
        match self {
            OptValue::KeyVal(kv) => {
                kv.remove_children(path);
                kv.remove_ancestors(path);
                kv.set(path, value)
            }
            OptValue::Json(m) => *json_slot(m, path) = Value::String(value.to_owned()),
        }
    }

    /// Sets `path` to null (`backing: null`; in key=value syntax an empty value).
    pub fn set_null(&mut self, path: &str) {
        match self {
            OptValue::KeyVal(kv) => {
                kv.remove(path);
                kv.remove_ancestors(path);
                kv.set(path, "")
            }
            OptValue::Json(m) => *json_slot(m, path) = Value::Null,
        }
    }

    /// Removes `path` and everything below it.
    pub fn remove(&mut self, path: &str) {
        match self {
            OptValue::KeyVal(kv) => kv.remove(path),
            OptValue::Json(m) => {
                let (parent, last) = match path.rsplit_once('.') {
                    Some((p, l)) => (Some(p), l),
                    None => (None, path),
                };
                let obj = match parent {
                    None => Some(m),
                    Some(p) => match json_at_mut(m, p) {
                        Some(Value::Object(o)) => Some(o),
                        _ => None,
                    },
                };
                if let Some(o) = obj {
                    o.remove(last);
                }
            }
        }
    }

    /// Keeps, at the level of `prefix` ("" for the top), only the members whose first path
    /// segment satisfies `keep`.
    pub fn retain_members(&mut self, prefix: &str, keep: impl Fn(&str) -> bool) {
        match self {
            OptValue::KeyVal(kv) => kv.retain_keys(|k| {
                let rel = if prefix.is_empty() {
                    Some(k)
                } else {
                    k.strip_prefix(prefix).and_then(|r| r.strip_prefix('.'))
                };
                match rel {
                    Some(r) => keep(r.split('.').next().unwrap_or(r)),
                    None => true,
                }
            }),
            OptValue::Json(m) => {
                let obj = if prefix.is_empty() {
                    Some(m)
                } else {
                    match json_at_mut(m, prefix) {
                        Some(Value::Object(o)) => Some(o),
                        _ => None,
                    }
                };
                if let Some(o) = obj {
                    o.retain(|k, _| keep(k));
                }
            }
        }
    }

    /// Every string value anywhere in the option (JSON: recursively), for reference scans.
    pub fn strings(&self) -> Vec<&str> {
        fn walk<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
            match v {
                Value::String(s) => out.push(s),
                Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
                Value::Object(o) => o.values().for_each(|x| walk(x, out)),
                _ => {}
            }
        }
        let mut out = Vec::new();
        match self {
            OptValue::KeyVal(kv) => out.extend(kv.values().map(|(_, v)| v)),
            OptValue::Json(m) => m.values().for_each(|v| walk(v, &mut out)),
        }
        out
    }
}

impl KeyVal {
    /// Removes `a` and `a.b` (scalars in the way) before `a.b.c` is set.
    fn remove_ancestors(&mut self, path: &str) {
        for (i, _) in path.match_indices('.') {
            let ancestor = &path[..i];
            self.items.retain(|(k, _)| k.as_deref() != Some(ancestor));
        }
    }

    fn remove_children(&mut self, key: &str) {
        self.items
            .retain(|(k, _)| !k.as_deref().is_some_and(|k| is_below(k, key)));
    }
}

fn json_at<'a>(m: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    let mut segs = path.split('.');
    let mut cur = m.get(segs.next()?)?;
    for s in segs {
        cur = cur.as_object()?.get(s)?;
    }
    Some(cur)
}

fn json_at_mut<'a>(m: &'a mut Map<String, Value>, path: &str) -> Option<&'a mut Value> {
    let mut segs = path.split('.');
    let mut cur = m.get_mut(segs.next()?)?;
    for s in segs {
        cur = cur.as_object_mut()?.get_mut(s)?;
    }
    Some(cur)
}

/// The slot at `path`, creating objects on the way (replacing scalars that are in the way).
fn json_slot<'a>(m: &'a mut Map<String, Value>, path: &str) -> &'a mut Value {
    let mut segs = path.split('.').peekable();
    let mut cur = m;
    loop {
        let seg = segs.next().unwrap_or_default();
        if segs.peek().is_none() {
            return cur.entry(seg.to_owned()).or_insert(Value::Null);
        }
        let next = cur
            .entry(seg.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        if !next.is_object() {
            *next = Value::Object(Map::new());
        }
        cur = match next {
            Value::Object(o) => o,
            _ => unreachable!("made an object above"),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keyval_escapes_and_implied_key() {
        let kv = KeyVal::parse("virtio-blk-pci,drive=d0,,x,serial=a=b,server");
        assert_eq!(kv.implied(), Some("virtio-blk-pci"));
        assert_eq!(kv.get("drive"), Some("d0,x"));
        assert_eq!(kv.get("serial"), Some("a=b"));
        assert_eq!(kv.render(), "virtio-blk-pci,drive=d0,,x,serial=a=b,server");
        assert_eq!(KeyVal::parse("").render(), "");
        assert_eq!(KeyVal::parse("a=1,a=2").get("a"), Some("2"));
    }

    #[test]
    fn keyval_edits_keep_the_rest() {
        let mut kv =
            KeyVal::parse("driver=qcow2,file.driver=file,file.filename=/a,,b,cache.direct=on");
        assert!(kv.has_children("file"));
        assert!(!kv.has_children("fil"));
        kv.remove("file");
        kv.set("file", "f0");
        kv.set("driver", "raw");
        assert_eq!(kv.render(), "driver=raw,cache.direct=on,file=f0");
    }

    #[test]
    fn both_forms_through_paths() {
        let mut j = OptValue::parse(
            r#"{"driver":"qcow2","node-name":"d","file":{"driver":"file","filename":"/x"},"read-only":false}"#,
            true,
        );
        let mut k = OptValue::parse(
            "driver=qcow2,node-name=d,file.driver=file,file.filename=/x,read-only=off",
            true,
        );
        for v in [&mut j, &mut k] {
            assert_eq!(v.get("file.filename").as_deref(), Some("/x"));
            assert!(v.is_inline("file"));
            assert!(!v.is_set("backing"));
            v.set("file.filename", "/new,1");
            v.set_null("backing");
            v.retain_members("", |k| k != "read-only");
            assert_eq!(v.get("file.filename").as_deref(), Some("/new,1"));
            assert!(!v.is_set("backing"));
            assert!(v.strings().contains(&"/new,1"));
        }
        assert_eq!(
            k.render(),
            "driver=qcow2,node-name=d,file.driver=file,file.filename=/new,,1,backing="
        );
        assert_eq!(
            j.render(),
            r#"{"backing":null,"driver":"qcow2","file":{"driver":"file","filename":"/new,1"},"node-name":"d"}"#
        );
        // A reference replaced by an inline child and back.
        let mut r = OptValue::parse("driver=qcow2,file=f0", true);
        r.set("file.filename", "/y");
        assert_eq!(r.render(), "driver=qcow2,file.filename=/y");
        r.set("file", "f1");
        assert_eq!(r.render(), "driver=qcow2,file=f1");
        // Not an object: read as key=value.
        assert!(matches!(
            OptValue::parse("{oops", true),
            OptValue::KeyVal(_)
        ));
        assert!(matches!(OptValue::parse("{}", false), OptValue::KeyVal(_)));
    }

    proptest! {
        #[test]
        fn keyval_never_panics_and_round_trips(s in "[a-z=,.{}\"\\\\ ]{0,40}") {
            let kv = KeyVal::parse(&s);
            let again = KeyVal::parse(&kv.render());
            prop_assert_eq!(kv, again);
            let mut v = OptValue::parse(&s, true);
            let _ = v.get("a.b");
            v.set("a.b", "x,y");
            v.remove("a");
            v.set_null("c");
            let _ = v.render();
        }
    }
}
