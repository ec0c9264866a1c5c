{{/* Helm's release labels, added to keygate's own on every object. */}}
{{- define "keygate.releaseLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The policy file's content: the policy value, else the chart's copy of the example. */}}
{{- define "keygate.policy" -}}
{{- if .Values.policy -}}{{ .Values.policy }}{{- else -}}{{ .Files.Get "files/policy.yaml" }}{{- end -}}
{{- end -}}
