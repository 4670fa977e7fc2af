-- OCR (issue 13): scanned page images are accepted uploads (PNG, JPEG, TIFF incl. multi-page).
ALTER TABLE documents DROP CONSTRAINT documents_document_type_check;
ALTER TABLE documents ADD CONSTRAINT documents_document_type_check
    CHECK (document_type IN ('pdf', 'txt', 'md', 'csv', 'json', 'html', 'png', 'jpeg', 'tiff'));
