//! Policy rules: Nomad's HCL policy language (and its JSON form), parsed for the blocks the double implements.
//!
//! The HCL form is read with `hcl-rs`, that is in HCL's native (version 2) syntax. Nomad itself decodes
//! policies with HCL version 1, which also takes several items on one line (`node { policy = "read" }
//! agent { policy = "read" }`, or two attributes inside one-line braces); the double refuses those as a parse
//! error (`Failed to parse ACL Policy: …`). Both read the documented form (one item per line), the JSON form,
//! `#`, `//` and `/* */` comments, `key = { … }` for a block, and heredoc strings.

use super::*;

/// One `key [label] { … }` (or `key = { … }`) or `key = value` item of a policy body.
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

/// An HCL body as items: blocks, and attributes whose value is an object (HCL 1's `key = { … }`), are
/// blocks; strings and templates (kept as written, as HCL 1 does not interpolate) are strings.
fn hcl_items(body: ::hcl::Body) -> Vec<Item> {
    body.into_iter()
        .map(|s| match s {
            ::hcl::Structure::Block(b) => Item::Block {
                key: b.identifier.to_string(),
                label: b.labels.first().map(|l| l.as_str().to_string()),
                body: hcl_items(b.body),
            },
            ::hcl::Structure::Attribute(a) => hcl_value(a.key.to_string(), a.expr),
        })
        .collect()
}

fn hcl_value(key: String, expr: ::hcl::Expression) -> Item {
    use ::hcl::{Expression, ObjectKey, TemplateExpr};
    let value = match expr {
        Expression::Object(o) => {
            let body = o
                .into_iter()
                .map(|(k, v)| {
                    let k = match k {
                        ObjectKey::Identifier(i) => i.to_string(),
                        ObjectKey::Expression(Expression::String(s)) => s,
                        other => other.to_string(),
                    };
                    hcl_value(k, v)
                })
                .collect();
            return Item::Block {
                key,
                label: None,
                body,
            };
        }
        Expression::String(s) => AttrValue::Str(s),
        Expression::TemplateExpr(t) => match *t {
            TemplateExpr::QuotedString(s) => AttrValue::Str(s),
            TemplateExpr::Heredoc(h) => AttrValue::Str(h.template),
        },
        _ => AttrValue::Other,
    };
    Item::Attr { key, value }
}

/// A parse error on one line, `At <line>:<column>: <message>` (HCL 1's shape); hcl-rs's own text is a
/// multi-line snippet with a caret.
fn one_line(e: &::hcl::Error) -> String {
    match e {
        ::hcl::Error::Parse(p) => {
            let at = p.location();
            let msg = p.message().split_whitespace().collect::<Vec<_>>().join(" ");
            format!("At {}:{}: {msg}", at.line(), at.column())
        }
        other => other
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
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
        hcl_items(
            ::hcl::parse(raw)
                .map_err(|e| format!("Failed to parse ACL Policy: {}", one_line(&e)))?,
        )
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
            bad("node { policy = \"read\" }\nnod { policy = \"read\" }"),
            "Invalid or duplicate policy keys: nod"
        );
        assert_eq!(
            bad("node { policy = \"read\" }\nnode { policy = \"write\" }"),
            "Invalid or duplicate policy keys: node"
        );
        assert_eq!(
            bad("node {\n  policy = \"read\"\n  level = \"x\"\n}"),
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

    /// What hcl-rs reads differently from the hand-written tokenizer it replaced, each as Nomad's HCL 1 does:
    /// escapes and heredocs are strings, and a parse error is one line.
    #[test]
    fn strings_are_hcl_strings_and_parse_errors_one_line() {
        // `\u` escapes (the hand tokenizer kept `u0072ead`).
        assert_eq!(
            parse_rules(r#"node { policy = "\u0072ead" }"#)
                .unwrap()
                .node,
            Some(Level::Read)
        );
        // A heredoc is a string with its newline (the hand tokenizer: `illegal char`), so not a level.
        assert_eq!(
            parse_rules("node {\n  policy = <<EOT\nread\nEOT\n}\n").unwrap_err(),
            r#"Invalid node policy: &acl.NodePolicy{Policy:"read\n"}"#
        );
        // A template is kept as written (HCL 1 does not interpolate policies).
        assert_eq!(
            parse_rules(r#"node { policy = "${x}" }"#).unwrap_err(),
            r#"Invalid node policy: &acl.NodePolicy{Policy:"${x}"}"#
        );
        // `key = { … }` with a nested object is still a block whose unknown keys are named.
        assert_eq!(
            parse_rules("node = {\n  policy = \"read\"\n  extra = { a = 1 }\n}").unwrap_err(),
            "Invalid or duplicate policy keys: extra"
        );
        for broken in [
            "node { policy = \"read\" ",
            "node {\n  policy = \"read\n}",
            "node { policy = = }",
        ] {
            let e = parse_rules(broken).unwrap_err();
            assert!(e.starts_with("Failed to parse ACL Policy: At "), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    /// HCL 1 layouts that Nomad accepts but HCL's native syntax does not: several items on one line. The double
    /// refuses them as a parse error (the hand tokenizer took them); one item per line reads the same.
    #[test]
    fn several_items_on_one_line_are_a_parse_error() {
        for one_line in [
            r#"node { policy = "read" } agent { policy = "read" }"#,
            r#"node { policy = "read" level = "x" }"#,
            r#"node { policy = "read", }"#,
        ] {
            let e = parse_rules(one_line).unwrap_err();
            assert!(
                e.starts_with("Failed to parse ACL Policy: At 1:"),
                "{one_line}: {e}"
            );
        }
        let r = parse_rules("node { policy = \"read\" }\nagent { policy = \"write\" }").unwrap();
        assert_eq!(
            (r.node, r.agent, r.operator),
            (Some(Level::Read), Some(Level::Write), None)
        );
    }
}
