{{/*
Chart name, `nameOverride` when set.
*/}}
{{- define "dfk8s.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Prefix of every object name: `<release>-<chart>`, or the release name alone when it already contains
the chart name. Truncated to 63 characters because some fields are DNS labels.
*/}}
{{- define "dfk8s.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart label value: `<name>-<version>`.
*/}}
{{- define "dfk8s.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels that select the pods of this release (never change them: selectors are immutable).
*/}}
{{- define "dfk8s.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dfk8s.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "dfk8s.labels" -}}
helm.sh/chart: {{ include "dfk8s.chart" . }}
{{ include "dfk8s.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Name of the launcher's ServiceAccount.
*/}}
{{- define "dfk8s.launcher.serviceAccountName" -}}
{{- if .Values.launcher.serviceAccount.create }}
{{- default (printf "%s-launcher" (include "dfk8s.fullname" .)) .Values.launcher.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.launcher.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Name of the reducer's ServiceAccount.
*/}}
{{- define "dfk8s.reducer.serviceAccountName" -}}
{{- if .Values.reducer.serviceAccount.create }}
{{- default (printf "%s-reducer" (include "dfk8s.fullname" .)) .Values.reducer.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.reducer.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Name of the credentials Secret (created or existing); empty when there is none.
*/}}
{{- define "dfk8s.secretName" -}}
{{- if .Values.secret.existingSecret }}
{{- .Values.secret.existingSecret }}
{{- else if .Values.secret.create }}
{{- printf "%s-credentials" (include "dfk8s.fullname" .) }}
{{- end }}
{{- end }}

{{/*
The dfk8s CPU image, tag defaulting to the chart's appVersion.
*/}}
{{- define "dfk8s.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
Pod-level fields shared by the chart's Deployments: restricted security, no API token (they never
call the API), no service-link env vars.
*/}}
{{- define "dfk8s.podDefaults" -}}
automountServiceAccountToken: false
enableServiceLinks: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}

{{/*
Name of the model cache PersistentVolumeClaim the chart creates (`modelCache.enabled`).
*/}}
{{- define "dfk8s.modelCache.claimName" -}}
{{- default (printf "%s-model-cache" (include "dfk8s.fullname" .)) .Values.modelCache.name }}
{{- end }}
