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
