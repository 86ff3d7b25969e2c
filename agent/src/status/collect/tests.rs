use super::*;

#[test]
fn xml_names_and_markers() {
    let xml = "<EnumerationResults><Blobs><Blob><Name>lab/nodes/a.json</Name></Blob><Blob><Name>lab/nodes/b&amp;c.json</Name></Blob></Blobs><NextMarker /></EnumerationResults>";
    assert_eq!(
        xml_values(xml, "Name"),
        vec!["lab/nodes/a.json", "lab/nodes/b&c.json"]
    );
    assert!(xml_values(xml, "NextMarker").is_empty());
}

#[test]
fn failures_keep_the_text_the_assessment_and_the_snapshots_read() {
    // assess::common::token_call_failed blames the token on a leading "HTTP 401" / "HTTP 403".
    let refused = CollectError::Status {
        status: 403,
        hint: Some("ACL not found".into()),
    };
    assert_eq!(refused.to_string(), "HTTP 403: ACL not found");
    let bare = CollectError::Status {
        status: 500,
        hint: None,
    };
    assert_eq!(bare.to_string(), "HTTP 500");
    assert_eq!(
        CollectError::Transport(Transport::Timeout).to_string(),
        "no answer within 3s"
    );
    assert_eq!(
        CollectError::List(Transport::Connect("Connection refused".into())).to_string(),
        "list node records: cannot connect: Connection refused"
    );
    assert_eq!(
        CollectError::Records(Box::new(CollectError::ListStatus(500))).to_string(),
        "node records: list node records: HTTP 500"
    );
    // An observation keeps the text; the document holds the bare string, as it always did.
    let got: Got<String> = Some(Err(NoAnswer::from(refused)));
    let json = serde_json::to_string(&got).unwrap();
    assert_eq!(json, r#"{"Err":"HTTP 403: ACL not found"}"#);
    assert_eq!(serde_json::from_str::<Got<String>>(&json).unwrap(), got);
}
