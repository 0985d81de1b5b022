{{/* The release's full name: the release name alone when it already says loraforge. */}}
{{- define "loraforge.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/*
Selector labels of the control plane. The component label keeps the Deployment's selector
apart from the worker Jobs the executor labels app.kubernetes.io/name=loraforge,
app.kubernetes.io/component=worker in the same namespace.
*/}}
{{- define "loraforge.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: control-plane
{{- end -}}

{{- define "loraforge.labels" -}}
{{ include "loraforge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "loraforge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "loraforge.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* How workers (and anything in the cluster) reach the API: the Service's DNS name. */}}
{{- define "loraforge.publicUrl" -}}
{{- printf "http://%s.%s.svc:%d" (include "loraforge.fullname" .) .Release.Namespace (int .Values.service.port) -}}
{{- end -}}
