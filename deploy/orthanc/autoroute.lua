-- Auto-routing of the test PACS, as a site would set it up for Sonocase: every
-- ultrasound image stored here (by a modality over DICOM, or uploaded in the
-- Orthanc UI) is forwarded to the node. What the node sends back - its SR, SC, SEG
-- and KO results, calling AE SONOCASE - stays here: forwarding it would re-open the study.
function OnStoredInstance(instanceId, tags, metadata, origin)
   if origin['RequestOrigin'] == 'DicomProtocol' and origin['RemoteAet'] == 'SONOCASE' then
      return
   end
   if tags['Modality'] == 'US' then
      SendToModality(instanceId, 'sonocase')
   end
end
