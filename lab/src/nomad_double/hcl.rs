//! Policy rules: Nomad's HCL policy language (and its JSON form), parsed for the blocks the double implements.

use super::*;

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(String),
    Punct(char),
}

/// HCL tokens with their 1-based line and column; comments (`#`, `//`, `/* */`) dropped.
fn hcl_tokens(src: &str) -> Result<Vec<(Tok, usize, usize)>, String> {
    let chars: Vec<char> = src.chars().collect();
    let (mut i, mut line, mut col) = (0usize, 1usize, 1usize);
    let mut out = Vec::new();
    let advance = |i: &mut usize, line: &mut usize, col: &mut usize, c: char| {
        *i += 1;
        if c == '\n' {
            *line += 1;
            *col = 1;
        } else {
            *col += 1;
        }
    };
    while i < chars.len() {
        let c = chars[i];
        let (l0, c0) = (line, col);
        if c.is_whitespace() || c == ',' {
            advance(&mut i, &mut line, &mut col, c);
        } else if c == '#' || (c == '/' && chars.get(i + 1) == Some(&'/')) {
            while i < chars.len() && chars[i] != '\n' {
                let d = chars[i];
                advance(&mut i, &mut line, &mut col, d);
            }
        } else if c == '/' && chars.get(i + 1) == Some(&'*') {
            advance(&mut i, &mut line, &mut col, '/');
            advance(&mut i, &mut line, &mut col, '*');
            loop {
                if i + 1 >= chars.len() {
                    return Err(format!("At {l0}:{c0}: comment not terminated"));
                }
                if chars[i] == '*' && chars[i + 1] == '/' {
                    advance(&mut i, &mut line, &mut col, '*');
                    advance(&mut i, &mut line, &mut col, '/');
                    break;
                }
                let d = chars[i];
                advance(&mut i, &mut line, &mut col, d);
            }
        } else if c == '"' {
            advance(&mut i, &mut line, &mut col, c);
            let mut s = String::new();
            loop {
                let Some(&d) = chars.get(i) else {
                    return Err(format!("At {l0}:{c0}: literal not terminated"));
                };
                if d == '\n' {
                    return Err(format!("At {l0}:{c0}: literal not terminated"));
                }
                advance(&mut i, &mut line, &mut col, d);
                match d {
                    '"' => break,
                    '\\' => {
                        let Some(&e) = chars.get(i) else {
                            return Err(format!("At {l0}:{c0}: literal not terminated"));
                        };
                        advance(&mut i, &mut line, &mut col, e);
                        s.push(match e {
                            'n' => '\n',
                            't' => '\t',
                            other => other,
                        });
                    }
                    other => s.push(other),
                }
            }
            out.push((Tok::Str(s), l0, c0));
        } else if c.is_ascii_alphabetic() || c == '_' {
            let mut s = String::new();
            while let Some(&d) = chars.get(i) {
                if d.is_ascii_alphanumeric() || d == '_' || d == '-' || d == '.' {
                    s.push(d);
                    advance(&mut i, &mut line, &mut col, d);
                } else {
                    break;
                }
            }
            out.push((Tok::Ident(s), l0, c0));
        } else if c.is_ascii_digit() || c == '-' {
            let mut s = String::new();
            while let Some(&d) = chars.get(i) {
                if d.is_ascii_digit() || d == '-' || d == '.' {
                    s.push(d);
                    advance(&mut i, &mut line, &mut col, d);
                } else {
                    break;
                }
            }
            out.push((Tok::Num(s), l0, c0));
        } else if matches!(c, '{' | '}' | '=' | '[' | ']') {
            advance(&mut i, &mut line, &mut col, c);
            out.push((Tok::Punct(c), l0, c0));
        } else {
            return Err(format!("At {l0}:{c0}: illegal char"));
        }
    }
    Ok(out)
}

/// One `key [label] [=] { … }` or `key = value` item of an HCL body.
#[derive(Debug)]
enum Item {
    Block {
        key: String,
        label: Option<String>,
        body: Vec<Item>,
    },
    Attr {
        key: String,
        value: AttrValue,
    },
}

#[derive(Debug)]
enum AttrValue {
    Str(String),
    Other,
}

fn hcl_body(
    toks: &[(Tok, usize, usize)],
    pos: &mut usize,
    nested: bool,
) -> Result<Vec<Item>, String> {
    let mut items = Vec::new();
    loop {
        let Some((t, l, c)) = toks.get(*pos) else {
            return if nested {
                Err("object expected closing RBRACE got: EOF".into())
            } else {
                Ok(items)
            };
        };
        let key = match t {
            Tok::Punct('}') if nested => {
                *pos += 1;
                return Ok(items);
            }
            Tok::Ident(k) | Tok::Str(k) => k.clone(),
            other => return Err(format!("At {l}:{c}: unexpected token {other:?}")),
        };
        *pos += 1;
        let mut label = None;
        if let Some((Tok::Str(s), _, _)) = toks.get(*pos) {
            label = Some(s.clone());
            *pos += 1;
        }
        let mut assigned = false;
        if let Some((Tok::Punct('='), _, _)) = toks.get(*pos) {
            assigned = true;
            *pos += 1;
        }
        match toks.get(*pos) {
            Some((Tok::Punct('{'), _, _)) => {
                *pos += 1;
                let body = hcl_body(toks, pos, true)?;
                items.push(Item::Block { key, label, body });
            }
            Some((Tok::Str(s), _, _)) if assigned && label.is_none() => {
                items.push(Item::Attr {
                    key,
                    value: AttrValue::Str(s.clone()),
                });
                *pos += 1;
            }
            Some((Tok::Num(_) | Tok::Ident(_), _, _)) if assigned && label.is_none() => {
                items.push(Item::Attr {
                    key,
                    value: AttrValue::Other,
                });
                *pos += 1;
            }
            Some((Tok::Punct('['), _, _)) if assigned && label.is_none() => {
                let mut depth = 0;
                while let Some((t, _, _)) = toks.get(*pos) {
                    *pos += 1;
                    match t {
                        Tok::Punct('[') => depth += 1,
                        Tok::Punct(']') => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                items.push(Item::Attr {
                    key,
                    value: AttrValue::Other,
                });
            }
            Some((_, l, c)) => {
                return Err(format!(
                    "At {l}:{c}: key '{key}' expected start of object ('{{') or assignment ('=')"
                ))
            }
            None => {
                return Err(format!(
                    "key '{key}' expected start of object ('{{') or assignment ('=')"
                ))
            }
        }
    }
}

/// The JSON form of a policy (`{"node": {"policy": "read"}, …}`) as the same items.
fn json_items(v: &Value) -> Result<Vec<Item>, String> {
    let Value::Object(m) = v else {
        return Err("root should be an object".into());
    };
    let mut items = Vec::new();
    for (k, v) in m {
        match v {
            Value::String(s) => items.push(Item::Attr {
                key: k.clone(),
                value: AttrValue::Str(s.clone()),
            }),
            Value::Object(inner)
                if inner.values().all(|x| x.is_object())
                    && matches!(k.as_str(), "namespace" | "host_volume" | "node_pool") =>
            {
                for (label, body) in inner {
                    items.push(Item::Block {
                        key: k.clone(),
                        label: Some(label.clone()),
                        body: json_items(body)?,
                    });
                }
            }
            Value::Object(_) => items.push(Item::Block {
                key: k.clone(),
                label: None,
                body: json_items(v)?,
            }),
            _ => items.push(Item::Attr {
                key: k.clone(),
                value: AttrValue::Other,
            }),
        }
    }
    Ok(items)
}

/// Nomad's `acl.Parse` in strict mode, for the blocks the double implements; the error texts are Nomad's
/// (`Invalid node policy: &acl.NodePolicy{Policy:"reed"}`, `Invalid or duplicate policy keys: nod`,
/// `Invalid policy: <raw>`), plus a clear refusal of valid Nomad blocks the double does not implement.
pub fn parse_rules(raw: &str) -> Result<Rules, String> {
    if raw.is_empty() {
        // Nomad's hot path: empty rules are an empty (valid, powerless) policy.
        return Ok(Rules::default());
    }
    let items = if raw.trim_start().starts_with('{') {
        let v: Value =
            serde_json::from_str(raw).map_err(|e| format!("Failed to parse ACL Policy: {e}"))?;
        json_items(&v).map_err(|e| format!("Failed to parse ACL Policy: {e}"))?
    } else {
        let toks = hcl_tokens(raw).map_err(|e| format!("Failed to parse ACL Policy: {e}"))?;
        let mut pos = 0;
        hcl_body(&toks, &mut pos, false).map_err(|e| format!("Failed to parse ACL Policy: {e}"))?
    };
    let mut extra: Vec<String> = Vec::new();
    // The value of each block's `policy` (None: the block is absent), in Nomad's check order.
    let mut blocks: [(&str, Option<String>); 3] =
        [("agent", None), ("node", None), ("operator", None)];
    for item in &items {
        let (key, label, body) = match item {
            Item::Block { key, label, body } => (key.as_str(), label, body),
            Item::Attr { key, .. } => {
                extra.push(key.clone());
                continue;
            }
        };
        match key {
            "namespace" | "node_pool" | "host_volume" | "plugin" | "quota" => {
                return Err(format!(
                    "{key} rules are valid Nomad but not implemented by the Nomad contract double \
                     (it implements node, agent and operator)"
                ))
            }
            "node" | "agent" | "operator" => {
                let slot = blocks
                    .iter_mut()
                    .find(|(k, _)| *k == key)
                    .expect("known block");
                if label.is_some() || slot.1.is_some() {
                    extra.push(key.to_string());
                    continue;
                }
                let mut policy = String::new();
                for it in body {
                    match it {
                        Item::Attr {
                            key: k,
                            value: AttrValue::Str(v),
                        } if k == "policy" => policy = v.clone(),
                        Item::Attr { key: k, .. } if k == "capabilities" && key == "operator" => {
                            return Err(
                                "operator capabilities are valid Nomad but not implemented by the \
                                        Nomad contract double (use policy = \"read\" or \"write\")"
                                    .into(),
                            )
                        }
                        Item::Attr { key: k, .. } | Item::Block { key: k, .. } => {
                            extra.push(k.clone())
                        }
                    }
                }
                slot.1 = Some(policy);
            }
            other => extra.push(other.to_string()),
        }
    }
    if blocks.iter().all(|(_, v)| v.is_none()) {
        return Err(format!("Invalid policy: {raw}"));
    }
    if !extra.is_empty() {
        return Err(format!(
            "Invalid or duplicate policy keys: {}",
            extra.join(", ")
        ));
    }
    let mut rules = Rules::default();
    for (key, value) in blocks {
        let Some(value) = value else { continue };
        let level = Level::parse(&value);
        if level.is_none() && !(key == "operator" && value.is_empty()) {
            let ty = match key {
                "node" => "NodePolicy",
                "agent" => "AgentPolicy",
                _ => "OperatorPolicy",
            };
            return Err(format!(
                "Invalid {key} policy: &acl.{ty}{{Policy:{value:?}}}"
            ));
        }
        match key {
            "node" => rules.node = level,
            "agent" => rules.agent = level,
            _ => rules.operator = level,
        }
    }
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_rules_parse_the_implemented_subset_like_nomad() {
        let r = parse_rules(STATUS_RULES).unwrap();
        assert_eq!(
            r,
            Rules {
                node: Some(Level::Read),
                agent: Some(Level::Read),
                operator: Some(Level::Read)
            }
        );
        // The JSON form, `=` before a block, /* */ comments.
        assert_eq!(
            parse_rules(r#"{"node": {"policy": "write"}}"#)
                .unwrap()
                .node,
            Some(Level::Write)
        );
        let r = parse_rules("/* a */ agent = { policy = \"deny\" }").unwrap();
        assert_eq!((r.agent, r.node), (Some(Level::Deny), None));
        // Empty rules are Nomad's hot path: valid, and grant nothing.
        assert_eq!(parse_rules("").unwrap(), Rules::default());

        let bad = |rules: &str| parse_rules(rules).unwrap_err();
        assert_eq!(
            bad(r#"node { policy = "reed" }"#),
            r#"Invalid node policy: &acl.NodePolicy{Policy:"reed"}"#
        );
        assert_eq!(
            bad("agent { }"),
            r#"Invalid agent policy: &acl.AgentPolicy{Policy:""}"#
        );
        assert_eq!(
            bad(r#"node { policy = "read" } nod { policy = "read" }"#),
            "Invalid or duplicate policy keys: nod"
        );
        assert_eq!(
            bad(r#"node { policy = "read" } node { policy = "write" }"#),
            "Invalid or duplicate policy keys: node"
        );
        assert_eq!(
            bad(r#"node { policy = "read" level = "x" }"#),
            "Invalid or duplicate policy keys: level"
        );
        assert_eq!(
            bad(r#"nod { policy = "read" }"#),
            r#"Invalid policy: nod { policy = "read" }"#
        );
        assert!(bad(r#"node { policy = "read" "#).starts_with("Failed to parse ACL Policy: "));
        assert!(bad(r#"node { policy = "read }"#).starts_with("Failed to parse ACL Policy: "));
        for unsupported in [
            r#"namespace "default" { policy = "read" }"#,
            r#"host_volume "x" { policy = "write" }"#,
            r#"operator { capabilities = ["snapshot-save"] }"#,
        ] {
            let e = bad(unsupported);
            assert!(
                e.contains("not implemented by the Nomad contract double"),
                "{e}"
            );
        }
    }
}
