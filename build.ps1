#!/usr/bin/env pwsh
# DispNative build script for PowerShell users: the same dotnet commands the README and CI use.
#   ./build.ps1 build | test | publish | bench [-Configuration Release] [-Model DIR]
param(
    [Parameter(Position = 0)][ValidateSet('build', 'test', 'publish', 'bench')][string]$Task = 'build',
    [string]$Configuration = 'Release',
    [string]$Model = ''
)
$ErrorActionPreference = 'Stop'
Set-Location $PSScriptRoot

function Invoke-Checked([string]$exe, [string[]]$arguments) {
    Write-Host "> $exe $($arguments -join ' ')"
    & $exe @arguments
    if ($LASTEXITCODE -ne 0) { throw "$exe exited with $LASTEXITCODE" }
}

switch ($Task) {
    'build'   { Invoke-Checked dotnet @('build', 'DispNative.sln', '-c', $Configuration) }
    'test'    { Invoke-Checked dotnet @('test', 'DispNative.sln', '-c', $Configuration) }
    'publish' { Invoke-Checked dotnet @('publish', 'tools/DispNative.Cli/DispNative.Cli.csproj', '-c', $Configuration, '-o', 'artifacts/DispNative') }
    'bench'   {
        $benchArgs = @('run', '--project', 'tools/DispNative.KernelBench', '-c', $Configuration, '--', 'cpu')
        if ($Model) { $benchArgs += @('--model', $Model) }
        Invoke-Checked dotnet $benchArgs
    }
}
